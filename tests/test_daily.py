"""A researcher's ordinary day with train.py (issue 16): resume by folder alone, Ctrl-C, progress in a log, exports
that timm loads, honest warnings and flags. Every test runs train.py / finetune.py end to end on tiny data."""
import csv
import os
import re
import signal
import time
from datetime import datetime

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import fresh_accelerate_state, log_lines, tiny_run  # noqa: F401  (fresh_accelerate_state: autouse)

import train
import tract.data
from tract.errors import ConfigError
from tract.runtime import EXIT_INTERRUPTED, EXIT_REQUEUE

# A TrAct run of a non-default model (not train.py's demo ViT), 2 epochs of 4 updates, λ off its default.
TRACT_RUN = ["--tract", "--tract-lambda", "0.3", "--epochs", "2", "--max-updates-per-epoch", "4", "--mixup", "0.8",
             "--drop-path", "0.1"]


class SignalAt(torch.utils.data.Dataset):
    """Sends this process ``sig`` when the n-th training item is read (a cluster's SIGTERM, a Ctrl-C), ``times`` times
    in a row when asked (a second Ctrl-C)."""

    def __init__(self, dataset, n, sig, times=1):
        self.dataset, self.n, self.sig, self.times, self.reads = dataset, n, sig, times, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.n:
            for _ in range(self.times):
                os.kill(os.getpid(), self.sig)
        return self.dataset[i]


def signal_during_training(monkeypatch, n, sig, times=1):
    """The next train.py run gets ``sig`` while it reads its n-th training item; monkeypatch.undo() ends that."""
    build = tract.data.build_dataset

    def build_with_signal(name, root, is_train, *args, **kwargs):
        dataset, classes = build(name, root, is_train, *args, **kwargs)
        return (SignalAt(dataset, n, sig, times) if is_train else dataset), classes

    monkeypatch.setattr(tract.data, "build_dataset", build_with_signal)


def same_weights(a, b):
    a, b = load_file(a), load_file(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tiny_imagefolder, tmp_path_factory):
    """The uninterrupted TrAct run every interrupted one must reproduce bitwise."""
    out = tmp_path_factory.mktemp("daily") / "reference"
    train.main(tiny_run(tiny_imagefolder, out, *TRACT_RUN))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out


# ---- 1. --resume RUN alone continues the run as it was started ---------------------------------------------------

def test_sigterm_mid_epoch_then_resume_by_folder_alone_is_bitwise_the_uninterrupted_tract_run(
        reference, tiny_imagefolder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    signal_during_training(monkeypatch, 22, signal.SIGTERM)  # item 22 of 4-image batches: in epoch 1 (the second)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_run(tiny_imagefolder, run, *TRACT_RUN))
    assert e.value.code == EXIT_REQUEUE
    assert os.readlink(run / "checkpoints" / "last").startswith("epoch-0001-plus-")
    assert f"(resume with --resume {run}, e.g. python train.py --resume {run})" in capsys.readouterr().out
    monkeypatch.undo()

    train.main(["--resume", str(run)])  # nothing else: model, TrAct, lambda, data, schedule from the run's args.yaml
    printed = capsys.readouterr().out
    assert "tract: on, layer patch_embed.proj, lambda 0.3" in printed and "note: resuming" not in printed
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")
    assert yaml.safe_load((run / "args.yaml").read_text())["tract_lambda"] == 0.3


def test_resume_refuses_an_option_that_changes_the_result_and_names_the_free_ones_in_one_line(
        reference, tmp_path, capsys):
    for flags, named in ((["--no-tract"], "--tract False (the run: True)"),
                         (["--tract-lambda", "0.1"], "--tract-lambda 0.1 (the run: 0.3)"),
                         (["--lr", "0.01"], "--lr 0.01 (the run: 0.001)"),
                         (["--input-size", "48"], "--input-size 48 (the run: 32)")):
        with pytest.raises(ConfigError) as e:
            train.main(["--resume", str(reference), "--eval", *flags])
        assert named in str(e.value) and "--resume-override" in str(e.value)
        assert f"python train.py --resume {reference}" in str(e.value)
    # what only changes speed or reporting is named, in one line, and not refused
    train.main(["--resume", str(reference), "--eval", "--num-workers", "1", "--val-interval", "2"])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: resuming")]
    assert notes == [f"note: resuming {reference} with its args.yaml, changed: --num-workers 0 -> 1; "
                     "--val-interval 1 -> 2"]
    # --resume-override lets a result-changing option through, said so in the same line
    train.main(["--resume", str(reference), "--eval", "--lr", "0.01", "--resume-override"])
    assert "--lr 0.001 -> 0.01 (--resume-override: no longer the uninterrupted run)" in capsys.readouterr().out


# ---- 3. Ctrl-C ------------------------------------------------------------------------------------------------------

def test_ctrl_c_mid_epoch_checkpoints_exits_130_and_resume_is_bitwise_the_uninterrupted_run(
        reference, tiny_imagefolder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    signal_during_training(monkeypatch, 10, signal.SIGINT)  # item 10: the 3rd batch of epoch 0
    with pytest.raises(SystemExit) as e:
        train.main(tiny_run(tiny_imagefolder, run, *TRACT_RUN))
    assert e.value.code == EXIT_INTERRUPTED
    assert os.readlink(run / "checkpoints" / "last") == "epoch-0000-plus-000003-updates"
    assert "interrupted at update 3 of epoch 1" in capsys.readouterr().out
    monkeypatch.undo()
    train.main(["--resume", str(run)])
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")


def test_a_second_ctrl_c_stops_at_once_in_one_line(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when pytest runs as a background job
    signal_during_training(monkeypatch, 10, signal.SIGINT, times=2)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_run(tiny_imagefolder, run, *TRACT_RUN))
    assert e.value.code == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["train.py: stopped at once by a second Ctrl-C; no checkpoint was written"]
    assert not (run / "checkpoints" / "last").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


# ---- 2. progress and the run's record -------------------------------------------------------------------------------

PROGRESS = re.compile(r"^\d\d:\d\d:\d\d epoch (\d)/2 \[(\d)/6\] loss (\d+\.\d{4})  lr (\S+)  (\d+) img/s  "
                      r"eta epoch (\d+:\d\d:\d\d), run (\d+:\d\d:\d\d)$")


def seconds(duration):
    h, m, s = map(int, duration.split(":"))
    return 3600 * h + 60 * m + s


def test_off_a_terminal_progress_is_a_line_every_log_interval_updates_with_loss_lr_rate_and_both_etas(
        tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny_run(tiny_imagefolder, out, "--epochs", "2", "--log-interval", "2")
    argv.remove("--no-progress")
    train.main(argv)  # pytest's captured stderr is not a terminal, as under SLURM or nohup
    lines = [PROGRESS.match(line) for line in capsys.readouterr().out.splitlines() if PROGRESS.match(line)]
    assert [(m[1], m[2]) for m in lines] == [(e, u) for e in "12" for u in "246"]
    # lr: cosine per epoch from 1e-3 to --min-lr 1e-5 over 2 epochs, written out: 1e-3, then 1e-5 + (1e-3 - 1e-5) / 2
    assert [float(m[4]) for m in lines] == [1e-3] * 3 + [pytest.approx(5.05e-4, rel=1e-3)] * 3
    assert all(int(m[5]) > 0 for m in lines)
    assert seconds(lines[-1][6]) == seconds(lines[-1][7]) == 0  # the run's last update: nothing left
    assert all(seconds(m[7]) >= seconds(m[6]) for m in lines)  # the run holds the epoch
    # the line's loss is the epoch's mean so far: at its last update, the epoch's train_loss in log.txt
    assert [float(lines[i][3]) for i in (2, 5)] == pytest.approx([r["train_loss"] for r in log_lines(out)], abs=1e-4)


def test_the_run_record_has_per_update_tensorboard_scalars_hparams_a_timm_summary_csv_and_time_stamps(
        tiny_imagefolder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    before = time.time()
    train.main(tiny_run(tiny_imagefolder, out, "--epochs", "2", "--clip-grad", "1.0", "--sync-interval", "4",
                        "--tract"))
    records = log_lines(out)
    events = EventAccumulator(str(out), size_guidance={"scalars": 0}).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [step for step, _ in scalars["update/loss"]] == list(range(1, 13))  # 6 updates per epoch, each one
    for epoch, record in enumerate(records):  # the per-update losses average to the epoch's loss
        losses = [v for step, v in scalars["update/loss"] if epoch * 6 < step <= epoch * 6 + 6]
        assert sum(losses) / 6 == pytest.approx(record["train_loss"], rel=1e-5)
    assert [v for _, v in scalars["update/lr"]] == pytest.approx([1e-3] * 6 + [5.05e-4] * 6, rel=1e-6)
    assert len(scalars["update/grad_norm"]) == 12 and all(v > 0 for _, v in scalars["update/grad_norm"])
    assert [(s, v) for s, v in scalars["test/acc1"]] == [(6, pytest.approx(records[0]["test_acc1"])),
                                                         (12, pytest.approx(records[1]["test_acc1"]))]
    assert "n_parameters" not in " ".join(scalars)  # a count, not a curve: it is among the hyperparameters
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = {k: v.number_value or v.string_value or v.bool_value for k, v in start.session_start_info.hparams.items()}
    assert hparams["tract"] == 1 and hparams["tract_lambda"] == pytest.approx(0.1) and hparams["model"] == \
        "vit_tiny_patch16_224" and hparams["lr"] == pytest.approx(1e-3)  # so TrAct and vanilla runs compare
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]  # timm's columns
    assert [float(row[k]) for row in rows for k in row] == pytest.approx(
        [r[k] for r in records for k in ("epoch", "train_loss", "test_loss", "test_acc1", "test_acc5", "train_lr")])
    stamps = [datetime.strptime(r["time"], "%Y-%m-%dT%H:%M:%S%z").timestamp() for r in records]
    assert before - 1 <= stamps[0] <= stamps[1] <= time.time() + 1


# ---- 4. the export loads with timm --------------------------------------------------------------------------------

def timm_accuracy(run, val_dir):
    """Top-1 (%) and mean cross-entropy of the run's export on val_dir, through timm's own loading and
    preprocessing only."""
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    import tract.models  # noqa: F401  (registers train.py's own models, e.g. vit_pico_patch7_28, with timm)

    model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model))
    names = model.pretrained_cfg["label_names"]
    correct = total = loss = 0
    with torch.no_grad():
        for folder in sorted(val_dir.iterdir()):
            for path in sorted(folder.iterdir()):
                logits = model(transform(Image.open(path).convert("RGB"))[None]).double()
                correct += names[logits.argmax(1).item()] == folder.name
                loss += (logits.logsumexp(1) - logits[0, names.index(folder.name)]).item()
                total += 1
    return 100.0 * correct / total, loss / total, model


@pytest.mark.parametrize("model", [[], ["--model", "vit_pico_patch7_28", "--model-kwargs", "--input-size", "28"]],
                         ids=["timm-vit", "registered-by-tract"])
def test_the_export_loads_with_timm_local_dir_and_its_preprocessing_reproduces_the_runs_eval_accuracy(
        reference, tiny_imagefolder, tmp_path, capsys, model):
    run = reference
    if model:  # one of tract/models.py's models, on 32-px images resized to 28 px
        run = tmp_path / "run"
        train.main(tiny_run(tiny_imagefolder, run, "--epochs", "2", "--max-updates-per-epoch", "3", *model))
        assert "data resize: 32 px images resized to 28 px for the model" in capsys.readouterr().out
    accuracy, loss, timm_model = timm_accuracy(run, tiny_imagefolder / "val")
    # the loss moves with any change of preprocessing (size, crop, mean, std, interpolation), the accuracy may not
    assert (accuracy, loss) == pytest.approx((log_lines(run)[-1]["test_acc1"], log_lines(run)[-1]["test_loss"]),
                                             rel=1e-5)
    assert timm_model.pretrained_cfg["label_names"] == sorted(p.name for p in (tiny_imagefolder / "train").iterdir())
    size = 28 if model else 32
    assert timm_model.num_classes == 3 and tuple(timm_model.pretrained_cfg["input_size"]) == (3, size, size)
    assert timm_model.pretrained_cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))  # ImageNet's, not timm's 0.5


# ---- 5. warnings, one epoch numbering, flags ------------------------------------------------------------------------

def test_an_lr_scaled_to_at_or_below_min_lr_or_warmup_lr_is_warned_in_the_dry_run(tiny_imagefolder, capsys):
    # finetune.py's case: 1e-5 per 512 images at batch 16 is 3.125e-7, under --min-lr 1e-6
    train.main(tiny_run(tiny_imagefolder, "unused", "--lr", "1e-5", "--no-unscale-lr", "--batch-size", "16",
                        "--min-lr", "1e-6", "--dry-run"))
    out = capsys.readouterr().out
    assert "  lr: 3.125e-07 (--lr 1e-05 per 512 images x global batch 16 / 512); WARNING: the peak lr 3.13e-07" in out
    assert "warning: the peak lr 3.13e-07 (--lr 1e-05 scaled by global batch / 512) is below --min-lr 1e-06, so the " \
        "cosine schedule rises instead of decaying: raise --lr (or lower --min-lr / --warmup-lr)" in out
    train.main(tiny_run(tiny_imagefolder, "unused", "--warmup-epochs", "1", "--epochs", "2", "--warmup-lr", "2e-3",
                        "--dry-run"))
    assert "at or below --warmup-lr 0.002, so the warmup goes down instead of up" in capsys.readouterr().out
    train.main(tiny_run(tiny_imagefolder, "unused", "--dry-run"))
    assert "WARNING" not in capsys.readouterr().out and "warning" not in capsys.readouterr().out


def test_tract_options_without_tract_are_named_in_one_warning(tiny_imagefolder, capsys):
    train.main(tiny_run(tiny_imagefolder, "unused", "--tract-lambda", "0.3", "--tract-sync-gram", "--dry-run"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: --tract-lambda 0.3, --tract-sync-gram True given without --tract: TrAct is off and "
                        "they do nothing (add --tract to train the first layer with TrAct)"]


def test_flags_are_never_abbreviated_and_a_typo_gets_the_closest_flag_in_two_lines(capsys):
    for argv, told in ((["--epoch", "1"], "--epoch (did you mean --epochs?)"),
                       (["--tract-lamda", "0.1"], "--tract-lamda (did you mean --tract-lambda?)")):
        with pytest.raises(SystemExit) as e:
            train.cli(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"train.py: error: unrecognized arguments: {told}",
            "train.py: python train.py --help lists every option"]


def test_epochs_are_numbered_from_1_in_log_messages_checkpoints_and_summary(reference):
    records = log_lines(reference)
    assert [r["epoch"] for r in records] == [1, 2]
    best = max(records, key=lambda r: r["test_acc1"])["epoch"]
    assert os.readlink(reference / "checkpoints" / "best") == f"epoch-{best:04d}"
    assert os.readlink(reference / "checkpoints" / "last") == "epoch-0002"
    with (reference / "summary.csv").open() as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]


# ---- 6. launching and one's own data --------------------------------------------------------------------------------

def test_cpu_yaml_launches_two_processes_with_no_environment_variable(tiny_imagefolder, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file", "launch/accelerate/cpu.yaml",
           "train.py", *tiny_run(tiny_imagefolder, tmp_path / "run", "--max-updates-per-epoch", "1")]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "processes: 2" in done.stdout and "global batch: 8" in done.stdout
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "last").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_train_split_and_val_split_name_an_image_folders_splits_and_the_dry_run_says_what_the_data_gets(
        tiny_imagefolder, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder / "train", data / "training")
    shutil.copytree(tiny_imagefolder / "val", data / "validation")
    argv = tiny_run(data, tmp_path / "run", "--dry-run")
    with pytest.raises(tract.data.DatasetError, match=r"(?s)no train/ folder \(it holds training/, validation/\).*"
                                                      r"--train-split NAME --val-split NAME"):
        train.main(argv)
    train.main([*argv, "--train-split", "training", "--val-split", "validation", "--model", "vit_pico_patch7_28",
                "--model-kwargs", "--input-size", "28", "--mixup", "0.8", "--warmup-epochs", "1", "--epochs", "3"])
    out = capsys.readouterr().out
    for line in ("  train images: 24", "  val images: 12", "  input: 28 px, 3 channel(s), mean (0.485, 0.456, 0.406), "
                 "std (0.229, 0.224, 0.225)",
                 "  data resize: 32 px images resized to 28 px for the model (--input-size 28; eval: resize to 28 px, "
                 "center crop 28)",
                 "  augmentation: simple random crop (resize, pad 4, crop; --src), horizontal flip, "
                 "mixup 0.8 / cutmix 0",
                 "  loss: SoftTargetCrossEntropy (mixup / cutmix targets, smoothed by them)",
                 "  warmup: 1 epoch(s) from --warmup-lr 1e-06"):
        assert line in out.splitlines(), line
    with pytest.raises(ConfigError, match="--train-split / --val-split name the folders of an image-folder dataset"):
        train.main(["--data-set", "CIFAR10", "--data-path", str(data), "--train-split", "training", "--dry-run"])
