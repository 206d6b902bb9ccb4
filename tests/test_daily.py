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
from tract.config import ConfigError
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
    assert os.readlink(run / "checkpoints" / "last").startswith("epoch-0001-update-")
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
    assert os.readlink(run / "checkpoints" / "last") == "epoch-0000-update-000003"
    assert "interrupted at update 3 of epoch 1" in capsys.readouterr().out
    monkeypatch.undo()
    train.main(["--resume", str(run)])
    assert same_weights(run / "model.safetensors", reference / "model.safetensors")


def test_a_second_ctrl_c_stops_at_once_in_one_line(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    signal_during_training(monkeypatch, 10, signal.SIGINT, times=2)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_run(tiny_imagefolder, run, *TRACT_RUN))
    assert e.value.code == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["train.py: stopped at once by a second Ctrl-C; no checkpoint was written"]
    assert not (run / "checkpoints" / "last").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


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
