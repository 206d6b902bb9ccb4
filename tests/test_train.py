"""train.py end to end on tiny data (CPU): outputs, TrAct on/off, exact resume, preemption, dry runs, errors, DDP."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import train
import tract.data
from tract import TrAct
from tract.config import parse_args
from tract.engine import build_criterion, build_mixup
from tract.errors import ConfigError
from tract.models import build_model
from tract.runtime import EXIT_REQUEUE, check_precision

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=1",
            "num_heads=2", "--input-size", "32"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; Accelerate keeps process-wide singletons between them."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_run(data, out, *extra):
    """Arguments of a few-second run on the conftest ImageFolder (24 train images, batch 4: 6 updates per epoch)."""
    return ["--data-set", "FOLDER", "--data-path", str(data), *TINY_VIT, "--batch-size", "4", "--epochs", "1",
            "--lr", "1e-3", "--unscale-lr", "--num-workers", "0", "--no-progress", "--output-dir", str(out), *extra]


def vanilla_vit(num_classes=3):
    return timm.create_model("vit_tiny_patch16_224", patch_size=8, embed_dim=32, depth=1, num_heads=2, img_size=32,
                             num_classes=num_classes)


def log_lines(out):
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


# ---- recipe pieces ---------------------------------------------------------------------------------------------

def test_bce_loss_is_bce_with_logits_on_targets_binarised_above_zero():
    args = parse_args(["--bce-loss", "--smoothing", "0", "--mixup", "0.8", "--cutmix", "1.0"])
    criterion, mixup = build_criterion(args, 10), build_mixup(args, 10)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    _, soft = mixup(x, y)
    logits = torch.randn(8, 10)
    # DeiT III engine.py: targets.gt(0.0), then BCEWithLogits (mean), here in float64 from the definition
    z, t = logits.double(), (soft > 0).double()
    reference = (z.clamp(min=0) - z * t + torch.log1p(torch.exp(-z.abs()))).mean()
    assert torch.allclose(criterion(logits, soft).double(), reference, rtol=1e-6, atol=0)
    # batch-mode mixup of two labels without smoothing: at most two positive classes per row, the true one among them
    positives = soft > 0
    assert positives.sum(1).le(2).all() and positives[torch.arange(8), y].all()


def test_deit3_names_get_layer_scale_1e_4_and_the_same_drop_path_in_every_block():
    args = parse_args(["--model", "deit_small_patch16_LS", "--drop-path", "0.05", "--input-size", "32"])
    model, layer = build_model(args, num_classes=3)
    assert layer is None and len(model.blocks) == 12
    for block in model.blocks:
        assert torch.equal(block.ls1.gamma, torch.full((384,), 1e-4))
        assert block.drop_path1.drop_prob == block.drop_path2.drop_prob == 0.05
    # timm's own name keeps timm's conventions: LayerScale 1e-6 and a linear ramp starting at 0
    args = parse_args(["--model", "deit3_small_patch16_224", "--drop-path", "0.05", "--input-size", "32"])
    model, _ = build_model(args, num_classes=3)
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((384,), 1e-6))
    assert isinstance(model.blocks[0].drop_path1, torch.nn.Identity)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.05)


def test_tract_wraps_the_first_layer_only_when_asked_and_leaves_the_init_unchanged():
    states = {}
    for flag in ("--tract", "--no-tract"):
        torch.manual_seed(0)
        model, layer = build_model(parse_args(TINY_VIT + [flag, "--tract-lambda", "0.2"]), num_classes=3)
        wrapped = [name for name, m in model.named_modules() if isinstance(m, TrAct)]
        assert wrapped == (["patch_embed.proj"] if flag == "--tract" else [])
        assert layer == (wrapped[0] if wrapped else None)
        states[flag] = model.state_dict()
    assert states["--tract"].keys() == states["--no-tract"].keys()
    assert all(torch.equal(states["--tract"][k], states["--no-tract"][k]) for k in states["--tract"])


def test_unknown_model_names_the_closest_ones():
    with pytest.raises(ConfigError, match=r"unknown model 'deit_smal_patch16_LS'.*deit_small_patch16_LS"):
        build_model(parse_args(["--model", "deit_smal_patch16_LS"]), num_classes=3)


def test_bf16_on_a_gpu_without_bf16_is_refused_with_the_fp16_fix(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    with pytest.raises(ConfigError, match=r"V100.*7\.0.*--mixed-precision fp16"):
        check_precision("bf16")
    check_precision("fp16")


# ---- dry runs of the paper configs -----------------------------------------------------------------------------

def vit_parameters(dim, depth, tokens, classes, patch=16, chans=3):
    """Parameter count of a DeiT III ViT (qkv bias, LayerScale, no class slot in pos_embed), from its layers."""
    block = (2 * dim) + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + dim \
        + (2 * dim) + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim) + dim
    return (chans * patch * patch * dim + dim) + dim + tokens * dim + depth * block + 2 * dim + dim * classes + classes


# The paper (arXiv:2410.23970, section 4.3) and DeiT III's README: global batch 2048 for every ImageNet run;
# ViT-S on 4 x A40, ViT-B on 8 x V100; lambda 0.1 (400 ep),
# 0.2 (800 ep); DeiT III lr 4e-3 (S) / 3e-3 (B) unscaled; ViT-B pretrains at 192 px.
PAPER_RUNS = [
    ("deit3_vit_s_400ep.yaml", 4, 0.1, 4e-3, vit_parameters(384, 12, 14 * 14, 10)),
    ("deit3_vit_s_800ep.yaml", 4, 0.2, 4e-3, vit_parameters(384, 12, 14 * 14, 10)),
    ("deit3_vit_b_400ep_192.yaml", 8, 0.1, 3e-3, vit_parameters(768, 12, 12 * 12, 10)),
]


@pytest.mark.parametrize("config, gpus, lam, lr, params", PAPER_RUNS)
def test_dry_run_of_each_paper_config_prints_the_recipe_and_writes_nothing(tmp_path, capsys, monkeypatch, config, gpus,
                                                                            lam, lr, params):
    out = tmp_path / "never"
    # Fashion-MNIST (10 classes) stands in for ImageNet: big enough for a full update of 256 x 2 images
    train.main(["-c", str(ROOT / "configs" / config), "--data-set", "FMNIST", "--output-dir", str(out),
                "--num-workers", "0", "--dry-run"])
    printed = dict(re.findall(r"^  ([a-z -]+): (.*)$", capsys.readouterr().out, flags=re.M))
    assert int(printed["parameters"]) == params
    batch, accum = int(printed["per-process batch"]), int(printed["accumulation steps"])
    assert batch * accum * int(printed["processes"]) == 2048  # --global-batch 2048 on whatever is launched
    assert printed["global batch"].startswith(f"2048 = {batch} per process x 1 process x {accum} accumulation steps")
    assert float(printed["lr"].split(" (")[0]) == lr
    assert printed["tract"] == f"on, layer patch_embed.proj, lambda {lam}"
    assert not out.exists()
    monkeypatch.setenv("WORLD_SIZE", str(gpus))  # the paper's GPUs: 256 images each, accumulated to 2048
    paper = parse_args(["-c", str(ROOT / "configs" / config)])
    assert (paper.batch_size, paper.accum_steps) == (256, 2048 // (256 * gpus))


# ---- end to end ------------------------------------------------------------------------------------------------

def test_run_with_and_without_tract_writes_a_complete_run_folder(tiny_imagefolder, tmp_path):
    weights = {}
    for flag in ("--tract", "--no-tract"):
        out = tmp_path / flag.strip("-")
        train.main(tiny_run(tiny_imagefolder, out, flag))
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "epoch-0001", "last"]
        assert os.readlink(out / "checkpoints" / "last") == os.readlink(out / "checkpoints" / "best") == "epoch-0001"
        assert list(out.glob("events.out.tfevents.*"))
        (line,) = log_lines(out)
        assert {"epoch", "train_lr", "train_loss", "test_loss", "test_acc1", "test_acc5", "n_parameters",
                "epoch_time", "images_per_sec"} <= line.keys()
        assert parse_args(["-c", str(out / "args.yaml")]).tract == (flag == "--tract")
        model = vanilla_vit()
        model.load_state_dict(load_file(out / "model.safetensors"), strict=True)
        weights[flag] = model.state_dict()
    # same init (tested above), so a difference can only come from training, and it is in the first layer
    first = "patch_embed.proj.weight"
    assert not torch.equal(weights["--tract"][first], weights["--no-tract"][first])


def test_fashion_mnist_is_the_default_dataset_and_its_config_wraps_the_stem_conv(tmp_path, capsys):
    train.main(["--dry-run", "--num-workers", "0", "--output-dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "on FMNIST" in out and "train images: 60000" in out and "val images: 10000" in out
    train.main(["-c", str(ROOT / "configs" / "fmnist_vit.yaml"), "--dry-run", "--num-workers", "0"])
    assert "tract: on, layer patch_embed.backbone.0.conv, lambda 0.1" in capsys.readouterr().out


def cosine_lr(t, total, warmup, base, warmup_lr, min_lr):
    """timm's cosine schedule with linear warmup (warmup inside the total), written out."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total))


def test_resume_gives_bitwise_the_weights_and_lr_sequence_of_an_uninterrupted_run(tiny_imagefolder, tmp_path):
    recipe = ["--epochs", "2", "--warmup-epochs", "1", "--warmup-lr", "1e-5", "--min-lr", "1e-4",
              "--sched-on-updates", "--mixup", "0.8", "--cutmix", "1.0", "--bce-loss", "--smoothing", "0",
              "--drop-path", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--model-ema-eval", "--tract",
              "--checkpoint-hist", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(tiny_run(tiny_imagefolder, straight, *recipe))
    train.main(tiny_run(tiny_imagefolder, resumed, *recipe, "--resume", str(straight / "checkpoints" / "epoch-0001")))
    for name in ("model.safetensors", "ema/model.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # per-update schedule: 6 updates per epoch; each epoch logs the lr of its last update
    expected = [cosine_lr(t, 12, 6, 1e-3, 1e-5, 1e-4) for t in (5, 11)]
    assert [line["train_lr"] for line in log_lines(straight)] == pytest.approx(expected, rel=1e-12)
    # the new folder's record starts at the checkpoint's epoch, whose evaluation it logs first
    assert [line["train_lr"] for line in log_lines(resumed)] == pytest.approx(expected, rel=1e-12)
    assert all(0 <= line["test_ema_acc1"] <= 100 for line in log_lines(straight))


class SignalAt(torch.utils.data.Dataset):
    """Sends this process SIGUSR1 when the n-th item is read, as a cluster would in the middle of an epoch."""

    def __init__(self, dataset, n):
        self.dataset, self.n, self.reads = dataset, n, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.n:
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.dataset[i]


def test_preemption_checkpoints_mid_epoch_exits_75_and_resume_skips_what_was_seen(tiny_imagefolder, tmp_path,
                                                                                  monkeypatch):
    recipe = ["--mixup", "0.8", "--drop-path", "0.1", "--tract"]
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    train.main(tiny_run(tiny_imagefolder, reference, *recipe))

    build = tract.data.build_dataset

    def build_with_signal(name, root, is_train, *args, **kwargs):
        dataset, classes = build(name, root, is_train, *args, **kwargs)
        return (SignalAt(dataset, 10) if is_train else dataset), classes  # item 10 is in the 3rd batch of 4

    monkeypatch.setattr(tract.data, "build_dataset", build_with_signal)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_run(tiny_imagefolder, preempted, *recipe))
    assert e.value.code == EXIT_REQUEUE
    assert os.readlink(preempted / "checkpoints" / "last") == "epoch-0000-plus-000003-updates"
    assert not (preempted / "model.safetensors").exists()
    monkeypatch.setattr(tract.data, "build_dataset", build)
    train.main(tiny_run(tiny_imagefolder, preempted, *recipe, "--resume", str(preempted)))
    a, b = load_file(reference / "model.safetensors"), load_file(preempted / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.readlink(preempted / "checkpoints" / "last") == "epoch-0001"


def test_preemption_during_evaluation_keeps_the_epoch_checkpoint_exits_75_and_resume_finishes_the_run(
        tiny_imagefolder, tmp_path, monkeypatch, capsys):
    reference, preempted = tmp_path / "reference", tmp_path / "preempted"
    train.main(tiny_run(tiny_imagefolder, reference, "--epochs", "2", "--tract"))

    build = tract.data.build_dataset

    def build_with_signal(name, root, is_train, *args, **kwargs):
        dataset, classes = build(name, root, is_train, *args, **kwargs)
        return (dataset if is_train else SignalAt(dataset, 1)), classes  # the first eval image of epoch 0

    monkeypatch.setattr(tract.data, "build_dataset", build_with_signal)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_run(tiny_imagefolder, preempted, "--epochs", "2", "--tract"))
    assert e.value.code == EXIT_REQUEUE
    assert f"preempted after epoch 1: exiting with 75 (resume with --resume {preempted}" in capsys.readouterr().out
    assert os.readlink(preempted / "checkpoints" / "last") == "epoch-0001"
    assert len(log_lines(preempted)) == 1 and not (preempted / "model.safetensors").exists()
    monkeypatch.setattr(tract.data, "build_dataset", build)
    train.main(tiny_run(tiny_imagefolder, preempted, "--epochs", "2", "--tract", "--resume", str(preempted)))
    a, b = load_file(reference / "model.safetensors"), load_file(preempted / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_of_a_finished_run_reports_its_accuracy_and_writes_nothing(tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(tiny_run(tiny_imagefolder, out))
    logged = log_lines(out)[-1]["test_acc1"]
    before = sorted(p.name for p in out.rglob("*"))
    capsys.readouterr()
    train.main(tiny_run(tiny_imagefolder, out, "--eval", "--resume", str(out)))
    acc1 = float(re.search(r"acc1 ([\d.]+)%", capsys.readouterr().out).group(1))
    assert acc1 == pytest.approx(logged, abs=0.01)
    train.main(tiny_run(tiny_imagefolder, out, "--eval", "--finetune", str(out / "model.safetensors")))
    acc1 = float(re.search(r"acc1 ([\d.]+)%", capsys.readouterr().out).group(1))
    assert acc1 == pytest.approx(logged, abs=0.01)
    assert sorted(p.name for p in out.rglob("*")) == before


# ---- refusals --------------------------------------------------------------------------------------------------

def test_a_new_run_into_a_folder_holding_a_run_is_refused_and_the_folder_kept(tiny_imagefolder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.yaml").write_text("lr: 1.0\n")
    with pytest.raises(ConfigError, match=f"already holds a run: pass --resume {out}"):
        train.main(tiny_run(tiny_imagefolder, out))
    assert [p.name for p in out.iterdir()] == ["args.yaml"] and (out / "args.yaml").read_text() == "lr: 1.0\n"


@pytest.mark.parametrize("extra, message", [
    (["--model", "vit_tinyy_patch16_224"], "unknown model 'vit_tinyy_patch16_224'; closest: vit_tiny_patch16_224"),
    (["--tract-lambda", "0"], "--tract-lambda must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--data-path", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
    (["--batch-size", "32"], "give no full update"),
])
def test_user_errors_end_in_one_message_before_anything_is_written(tiny_imagefolder, tmp_path, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.cli(tiny_run(tiny_imagefolder, out) + extra)
    assert str(e.value.code).startswith("train.py: error: ") and message in str(e.value.code)
    assert not out.exists()


def test_user_error_is_told_once_per_machine_by_the_first_process_that_meets_it(tiny_imagefolder, tmp_path,
                                                                                monkeypatch):
    import tempfile

    argv = tiny_run(tiny_imagefolder, tmp_path / "out") + ["--tract-lambda", "0"]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of one launch on this machine
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"test-{tmp_path.name}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the processes of a machine agree who tells
    for local_rank, told in (("1", True), ("0", False)):  # process 1 meets it first here
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(SystemExit) as e:
            train.cli(argv)
        assert (str(e.value.code).startswith("train.py: error: --tract-lambda must be > 0") if told
                else e.value.code == 1)


@pytest.mark.parametrize("local_rank, told", [("0", True), ("3", False)])
def test_bad_flag_is_told_by_the_first_process_of_each_machine_only(local_rank, told, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(SystemExit) as e:
        train.cli(["--tract-lamda", "0.1"])
    assert e.value.code == 2
    assert ("unrecognized arguments: --tract-lamda" in capsys.readouterr().err) == told


def test_command_line_error_exits_non_zero_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data-set", "FOLDER", "--data-path", str(tmp_path / "no"),
                             "--output-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "train.py: error:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ---- two processes ---------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_run_on_cpu_finishes_with_one_set_of_outputs(tiny_imagefolder, tmp_path):
    out = tmp_path / "ddp"
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "train.py",
           *tiny_run(tiny_imagefolder, out, "--tract", "--repeated-aug", "--epochs", "2")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "processes: 2" in result.stdout and "global batch: 8" in result.stdout
    assert [line["epoch"] for line in log_lines(out)] == [1, 2]
    assert os.readlink(out / "checkpoints" / "last") == "epoch-0002" and (out / "checkpoints" / "best").is_dir()
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    vanilla_vit().load_state_dict(load_file(out / "model.safetensors"), strict=True)
