"""finetune.py end to end: train.py output -> finetune at a new size and class count, --eval, every config's dry run."""
import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

import datagen
import finetune
import train
from conftest import write_image_folder

TINY_VIT = ["--model", "deit3_small_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=24", "depth=2",
            "num_heads=2"]
SMALL_RUN = ["--batch-size", "8", "--num-workers", "0", "--no-progress"]
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def bicubic_grid(tokens: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Reference: (1, old*old, D) position tokens resized to a new*new grid by plain float64 bicubic (DeiT's)."""
    grid = tokens.double().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_imagefolder) -> Path:
    """A 1-epoch train.py run with TrAct: a tiny ViT (4-px patches) at 32 px on the 3-class ImageFolder."""
    run = tmp_path_factory.mktemp("pretrain") / "run"
    train.main(["--data-set", "FOLDER", "--data-path", str(tiny_imagefolder), *TINY_VIT, "--input-size", "32",
                "--epochs", "1", "--tract", "--output-dir", str(run), *SMALL_RUN])
    return run


@pytest.mark.parametrize("tract", [True, False], ids=["tract", "vanilla"])
def test_train_output_finetunes_at_48px_on_5_classes_starting_from_the_pretrained_weights(
        pretrained, tmp_path, capsys, tract):
    five_classes = write_image_folder(tmp_path / "five", num_classes=5, seed=1)
    out = tmp_path / "finetune"
    # No model options: they come from the pretraining run's args.yaml. One update at lr 1e-5 * 8/512 barely moves
    # the weights, so the result must still equal the pretrained weights, adapted.
    run = ["--data-set", "FOLDER", "--data-path", str(five_classes), "--input-size", "48", "--max-updates-per-epoch",
           "1", "--output-dir", str(out), "--tract" if tract else "--no-tract", *SMALL_RUN]
    finetune.main(["--finetune", str(pretrained), "--epochs", "1", *run])
    printed = capsys.readouterr().out
    assert ("tract: on, layer patch_embed.proj" if tract else "tract: off") in printed

    before, after = load_file(pretrained / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before)  # the vanilla timm keys, TrAct or not
    assert after["head.weight"].shape == (5, 24) and after["head.bias"].shape == (5,)
    torch.testing.assert_close(after["pos_embed"].double(), bicubic_grid(before["pos_embed"], 8, 12),
                               atol=1e-5, rtol=0)
    for key, value in before.items():
        if not key.startswith(("head.", "pos_embed")):
            torch.testing.assert_close(after[key], value, atol=1e-5, rtol=0, msg=key)
    assert yaml.safe_load((out / "args.yaml").read_text())["finetune"] == str(pretrained)

    # Continuing the finetune run needs no model options either: they come from its own args.yaml.
    finetune.main(["--resume", str(out), "--epochs", "2", *run])
    assert "resumed from" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_eval_with_finetune_weights_reports_the_pretrained_models_accuracy(pretrained, tiny_imagefolder, capsys):
    weights = pretrained / "model.safetensors"
    finetune.main(["--eval", "--finetune", str(weights), "--data-set", "FOLDER", "--data-path", str(tiny_imagefolder),
                   "--input-size", "32", *SMALL_RUN])
    found = re.search(r"eval on (\d+) images: acc1 ([\d.]+)%  acc5 [\d.]+%  loss ([\d.]+)", capsys.readouterr().out)
    assert found, "no eval line printed"

    from torchvision import datasets, transforms

    model = timm.create_model("deit3_small_patch16_224", img_size=32, patch_size=4, embed_dim=24, depth=2,
                              num_heads=2, num_classes=3)
    model.load_state_dict(load_file(weights))
    # 32-px images at eval size 32 and crop ratio 1.0: the eval transform is only tensor conversion + normalisation.
    val = datasets.ImageFolder(str(tiny_imagefolder / "val"), transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    images = torch.stack([img for img, _ in val])
    labels = torch.tensor([label for _, label in val])
    with torch.no_grad():
        logits = model.eval()(images)
    assert int(found[1]) == len(val)
    assert float(found[2]) == pytest.approx(100.0 * (logits.argmax(1) == labels).double().mean().item(), abs=0.01)
    assert float(found[3]) == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-4)


def test_finetune_without_weights_is_refused_before_anything_runs(tiny_imagefolder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        finetune.cli(["--data-set", "FOLDER", "--data-path", str(tiny_imagefolder),
                      "--output-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "finetune.py: error: the following arguments are required: --finetune" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_finetune_help_states_the_precedence_and_shows_finetune_as_required(capsys):
    with pytest.raises(SystemExit) as e:
        finetune.parse_finetune_args(["--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    usage = shown[:shown.index("\n\n")]
    assert " --finetune WEIGHTS" in usage and "[--finetune WEIGHTS]" not in usage  # required, not optional
    assert "Finetune pretrained weights with DeiT III's finetuning recipe" in shown
    precedence = shown[shown.index("Precedence, highest first:"):]
    assert precedence.index("1. the command line") < precedence.index("2. a -c YAML config") < precedence.index(
        "3. the pretraining run's args.yaml")
    with pytest.raises(SystemExit):
        train.cli(["--help"])
    assert "[--finetune WEIGHTS]" in capsys.readouterr().out  # optional for train.py


def test_a_config_whose_model_contradicts_the_runs_weights_is_one_message_naming_both(pretrained, tiny_imagefolder,
                                                                                     tmp_path):
    config = tmp_path / "vit_b.yaml"
    config.write_text("model: deit_base_patch16_LS\n")
    argv = ["--finetune", str(pretrained), "--data-set", "FOLDER", "--data-path", str(tiny_imagefolder), "--dry-run",
            *SMALL_RUN]
    with pytest.raises(finetune.ConfigError) as e:
        finetune.main(["-c", str(config), *argv])
    assert str(e.value).startswith(f"the config {config} sets --model deit_base_patch16_LS, but the weights "
                                   f"{pretrained} are a --model deit3_small_patch16_224 (their run's "
                                   f"{pretrained / 'args.yaml'})")
    assert "pass --model deit3_small_patch16_224 (the command line wins over -c)" in str(e.value)
    with pytest.raises(finetune.ConfigError, match="the command line sets --in-chans 1, but the weights .* are a "
                                                   "--in-chans 3 .* or leave it out"):
        finetune.main([*argv, "--in-chans", "1"])
    finetune.main(["-c", str(config), *argv, "--model", "deit_small_patch16_LS"])  # DeiT III's name of the run's


def test_weights_of_another_architecture_from_a_file_are_one_weights_error_not_a_traceback(tiny_imagefolder, tmp_path):
    from tract.errors import WeightsError

    # a ViT of width 96 with a class token, as a file (no run's args.yaml tells its architecture): timm's converter
    # used to fail inside resample_abs_pos_embed with a traceback
    weights = zero_weights(tmp_path / "weights.safetensors", "vit_pico_patch7_28")
    with pytest.raises(WeightsError, match=r"the weights are not this model's architecture \(VisionTransformer, "
                                           r"embed_dim 384; the weights have pos_embed \(1, 17, 96\)"):
        finetune.main(["--finetune", str(weights), "--model", "deit_small_patch16_LS",
                       "--input-size", "32", "--data-set", "FOLDER", "--data-path", str(tiny_imagefolder),
                       "--dry-run", *SMALL_RUN])


# ---- every config, dry run: resolved values and weight adaptation, on tiny data in each dataset's real format -------

def zero_weights(path: Path, name: str, **kwargs) -> Path:
    """A full-size pretrained checkpoint's shapes (values zero), built without initialising the real model."""
    with torch.device("meta"):
        shapes = timm.create_model(name, **kwargs).state_dict()
    save_file({k: torch.zeros(v.shape) for k, v in shapes.items()}, path)
    return path


@pytest.fixture(scope="module")
def vit_b_192(tmp_path_factory) -> Path:
    """DeiT III ViT-B pretrained at 192 px on 1000 classes (the input of configs/deit3_vit_b_ft224.yaml)."""
    return zero_weights(tmp_path_factory.mktemp("vit_b") / "model.safetensors", "deit3_base_patch16_224", img_size=192)


@pytest.fixture(scope="module")
def vit_s_224(tmp_path_factory) -> Path:
    """DeiT III ViT-S pretrained at 224 px on 1000 classes (the input of the transfer configs)."""
    return zero_weights(tmp_path_factory.mktemp("vit_s") / "model.safetensors", "deit3_small_patch16_224")


# config -> (writer of a dataset root with enough training images for one update of the config's global batch on one
# process, class count, pretrained weights)
DRY_RUNS = {
    "deit3_vit_b_ft224": (lambda root: write_image_folder(root, train_per_class=171, val_per_class=1, size=8), 3,
                          "vit_b_192"),
    "deit3_vit_s_ft224": (lambda root: write_image_folder(root, train_per_class=171, val_per_class=1, size=8), 3,
                          "vit_s_224"),
    "transfer_cifar10": (lambda root: datagen.write_cifar(root, 10, n_train=768, n_test=2), 10, "vit_s_224"),
    "transfer_cifar100": (lambda root: datagen.write_cifar(root, 100, n_train=768, n_test=2), 100, "vit_s_224"),
    "transfer_flowers": (lambda root: datagen.write_flowers(root, n_train=384, n_val=384, n_test=2, size=(8, 8)), 102,
                         "vit_s_224"),
    "transfer_cars": (lambda root: datagen.write_cars(root, n_train=768, n_test=2, size=(8, 8)), 196, "vit_s_224"),
}


@pytest.mark.parametrize("config", list(DRY_RUNS))
def test_config_dry_run_resolves_the_recipe_and_adapts_the_pretrained_weights(config, request, tmp_path, capsys,
                                                                              monkeypatch):
    write, num_classes, weights_fixture = DRY_RUNS[config]
    datagen.skip_md5_checks(monkeypatch)
    write(tmp_path / "data")
    weights = request.getfixturevalue(weights_fixture)
    path = CONFIGS / f"{config}.yaml"
    finetune.main(["-c", str(path), "--dry-run", "--data-path", str(tmp_path / "data"), "--finetune", str(weights),
                   "--num-workers", "0", "--output-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert not (tmp_path / "out").exists()

    cfg = yaml.safe_load(path.read_text())
    width = 768 if "vit_b" in config else 384
    expected = {"classes": num_classes, "epochs": cfg["epochs"], "global batch": cfg["global_batch"],
                "lr": f"{cfg['lr'] * cfg['global_batch'] / 512:.6g}",  # DeiT's linear scaling to the global batch
                "optimizer": "AdamW, eps 1e-08",  # DeiT main.py's --opt-eps
                "tract": "off"}  # the weights are not a train.py run and the config does not set TrAct
    for key, value in expected.items():
        assert f"  {key}: {value}" + {"lr": " (--lr", "global batch": " = "}.get(key, "\n") in printed, key
    assert "finetune.py: TrAct off: from the config and command line (the weights are not a train.py run" in printed
    assert (f"weights have head.bias (1000,), head.weight (1000, {width}); "
            f"model has head.bias ({num_classes},)") in printed
    resampled = "resampled pos_embed (bicubic) from (1, 144, 768) to (1, 196, 768)" in printed
    assert resampled == (config == "deit3_vit_b_ft224")  # 192 -> 224 px; the transfer runs stay at 224


# ---- TrAct on/off and lambda: the pretraining run's, whatever the config; only the command line changes them ----

def run_folder(pretrained: Path, tmp_path: Path, name: str, **changes) -> Path:
    """A train.py run folder: the fixture's weights and its args.yaml with ``changes`` (e.g. a vanilla run)."""
    run = tmp_path / name
    run.mkdir()
    (run / "model.safetensors").symlink_to(pretrained / "model.safetensors")
    args = yaml.safe_load((pretrained / "args.yaml").read_text())
    (run / "args.yaml").write_text(yaml.safe_dump({**args, **changes}, sort_keys=False))
    return run


TRANSFER = ["-c", str(CONFIGS / "transfer_cifar10.yaml"), "--data-path", "data/cifar10"]


@pytest.mark.parametrize("column, run_tract, expected", [
    ("baseline", {"tract": False}, (False, 0.1)),
    ("tract", {"tract": True, "tract_lambda": 0.2}, (True, 0.2)),
])
def test_finetuning_takes_tract_on_off_and_lambda_from_the_pretraining_run_not_the_config(
        pretrained, tmp_path, capsys, column, run_tract, expected):
    run = run_folder(pretrained, tmp_path, column, **run_tract)
    args = finetune.parse_finetune_args([*TRANSFER, "--finetune", str(run)])
    assert (args.tract, args.tract_lambda) == expected
    assert f"TrAct {'on, lambda 0.2' if expected[0] else 'off'}: from the run {run / 'args.yaml'}" in \
        capsys.readouterr().out
    # A config that sets TrAct cannot flip the run's setting either.
    flipping = tmp_path / "flip.yaml"
    flipping.write_text(f"tract: {str(not expected[0]).lower()}\ntract_lambda: 0.05\n")
    args = finetune.parse_finetune_args(["-c", str(flipping), "--finetune", str(run)])
    assert (args.tract, args.tract_lambda) == expected


def test_a_command_line_that_contradicts_the_pretraining_run_wins_and_is_named_in_one_line(pretrained, tmp_path,
                                                                                           capsys):
    run = run_folder(pretrained, tmp_path, "vanilla", tract=False)
    args = finetune.parse_finetune_args([*TRANSFER, "--finetune", str(run), "--tract"])
    assert (args.tract, args.tract_lambda) == (True, 0.1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "TrAct" in line]
    assert lines == [f"finetune.py: TrAct on, lambda 0.1: from the command line, which differs from the run "
                     f"{run / 'args.yaml'} (TrAct off)"]
    # Agreeing with the run is not a contradiction; lambda alone changes lambda and keeps the run's on/off.
    args = finetune.parse_finetune_args([*TRANSFER, "--finetune", str(run), "--no-tract"])
    assert "differs" not in capsys.readouterr().out and args.tract is False
    tract_run = run_folder(pretrained, tmp_path, "tract", tract=True, tract_lambda=0.2)
    args = finetune.parse_finetune_args([*TRANSFER, "--finetune", str(tract_run), "--tract-lambda", "0.1"])
    assert (args.tract, args.tract_lambda) == (True, 0.1) and "differs" in capsys.readouterr().out


def test_weights_that_are_not_a_run_finetune_without_tract_unless_asked(vit_s_224, capsys):
    assert finetune.parse_finetune_args([*TRANSFER, "--finetune", str(vit_s_224)]).tract is False
    args = finetune.parse_finetune_args([*TRANSFER, "--finetune", str(vit_s_224), "--tract", "--tract-lambda", "0.2"])
    assert (args.tract, args.tract_lambda) == (True, 0.2)
    assert "TrAct on, lambda 0.2: from the config and command line" in capsys.readouterr().out
