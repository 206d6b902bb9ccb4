"""The command line contract: precedence, YAML checking, args.yaml round trip, DeiT flag names, bad values."""
import argparse

import pytest
import yaml

from tract.config import get_args_parser, parse_args, save_args
from tract.errors import ConfigError

# DeiT III's README command for ViT-S (github.com/facebookresearch/deit, README_revenge.md) with its two typos fixed.
DEIT3_README = ("--model deit_small_patch16_LS --data-path X --batch 256 --lr 4e-3 --epochs 800 --weight-decay 0.05 "
                "--sched cosine --input-size 224 --eval-crop-ratio 1.0 --reprob 0.0 --smoothing 0.0 "
                "--warmup-epochs 5 --drop 0.0 --seed 0 --opt fusedlamb --warmup-lr 1e-6 --mixup .8 --drop-path 0.05 "
                "--cutmix 1.0 --unscale-lr --repeated-aug --bce-loss --color-jitter 0.3 --ThreeAugment")


def write_yaml(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_yaml_overrides_default_and_command_line_overrides_yaml(tmp_path):
    cfg = write_yaml(tmp_path, "lr: 4e-3\nepochs: 7\nbatch_size: 32\n")
    args = parse_args(["-c", cfg, "--epochs", "9"])
    assert args.lr == 4e-3 and isinstance(args.lr, float)  # YAML 1.1 reads 4e-3 as a string: coerced
    assert args.epochs == 9  # command line wins over YAML
    assert args.batch_size == 32  # YAML wins over the default
    assert args.weight_decay == get_args_parser().get_default("weight_decay")  # untouched default


def test_unknown_yaml_key_is_an_error_naming_the_closest_valid_key(tmp_path):
    cfg = write_yaml(tmp_path, "lr: 1e-3\nwarmup_epoch: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'warmup_epoch' \(did you mean 'warmup_epochs'\?\)"):
        parse_args(["-c", cfg])


def test_yaml_values_of_the_wrong_kind_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="tract.*true or false"):
        parse_args(["-c", write_yaml(tmp_path, "tract: maybe\n")])
    with pytest.raises(ConfigError, match="mixed_precision.*one of"):
        parse_args(["-c", write_yaml(tmp_path, "mixed_precision: fp8\n")])


def test_args_yaml_round_trips_through_dash_c(tmp_path):
    argv = DEIT3_README.split() + ["--model-kwargs", "global_pool=avg", "qkv_bias=False", "--tract",
                                   "--tract-lambda", "0.2", "--opt-betas", "0.9", "0.95", "--output-dir", "runs/x"]
    args = parse_args(argv)
    save_args(args, tmp_path / "args.yaml")
    again = parse_args(["-c", str(tmp_path / "args.yaml")])
    skip = {"config", "resume", "eval", "dry_run"}
    assert {k: v for k, v in vars(again).items() if k not in skip} == {
        k: v for k, v in vars(args).items() if k not in skip}
    assert yaml.safe_load((tmp_path / "args.yaml").read_text())["model_kwargs"] == {"global_pool": "avg",
                                                                                     "qkv_bias": False}


def test_deit3_readme_command_parses_into_deit3_values():
    args = parse_args(DEIT3_README.split())
    expected = dict(model="deit_small_patch16_LS", data_path="X", batch_size=256, lr=4e-3, epochs=800,
                    weight_decay=0.05, sched="cosine", input_size=224, eval_crop_ratio=1.0, reprob=0.0,
                    smoothing=0.0, warmup_epochs=5, drop=0.0, seed=0, opt="fusedlamb", warmup_lr=1e-6, mixup=0.8,
                    drop_path=0.05, cutmix=1.0, unscale_lr=True, repeated_aug=True, bce_loss=True, color_jitter=0.3,
                    three_augment=True,
                    # not on the command line: DeiT's defaults must hold
                    min_lr=1e-5, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode="batch", src=False,
                    sched_on_updates=False, train_interpolation="bicubic", tract=False)
    assert {k: getattr(args, k) for k in expected} == expected


def test_underscore_and_kebab_spellings_are_the_same_option():
    a = parse_args(["--output_dir", "o", "--num_workers", "3", "--data_path", "d"])
    b = parse_args(["--output-dir", "o", "--num-workers", "3", "--data-path", "d"])
    assert (a.output_dir, a.num_workers, a.data_path) == (b.output_dir, b.num_workers, b.data_path) == ("o", 3, "d")


@pytest.mark.parametrize("flag", ["tract", "bce-loss", "ThreeAugment", "repeated-aug", "model-ema", "unscale-lr",
                                  "progress", "pin-mem", "src", "sched-on-updates"])
def test_every_boolean_turns_both_ways(flag):
    dest = {"ThreeAugment": "three_augment"}.get(flag, flag.replace("-", "_"))
    extra = ["--smoothing", "0"]  # --bce-loss refuses label smoothing
    assert getattr(parse_args([f"--{flag}"] + extra), dest) is True
    assert getattr(parse_args([f"--no-{flag}"] + extra), dest) is False


def test_model_kwargs_values_are_python_literals():
    args = parse_args(["--model-kwargs", "patch_size=4", "embed_dim=64", "init_values=1e-4", "global_pool=avg"])
    assert args.model_kwargs == {"patch_size": 4, "embed_dim": 64, "init_values": 1e-4, "global_pool": "avg"}


@pytest.mark.parametrize("flag", ["--nodes", "--ngpus"])
def test_submitit_flags_point_to_accelerate(flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args([flag, "2"])
    err = capsys.readouterr().err
    assert e.value.code != 0 and f"{flag} is DeiT's" in err and "Accelerate" in err and "docs/launch.md" in err


@pytest.mark.parametrize("argv, message", [
    (["--tract-lambda", "0"], "--tract-lambda must be > 0"),
    (["--tract-lambda", "-0.1"], "--tract-lambda must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--lr=-1e-3"], "--lr must be > 0"),
    (["--accum-steps", "0"], "--accum-steps must be > 0"),
    (["--drop-path", "1.5"], "--drop-path must be in"),
    (["--bce-loss", "--smoothing", "0.1"], "--smoothing 0.0 with --bce-loss"),
    (["--eval"], "--eval needs weights"),
    (["--ThreeAugment", "--aa", "rand-m9-mstd0.5-inc1"], "--ThreeAugment replaces"),
])
def test_bad_values_are_refused_with_the_fix(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_args(argv)


def test_finetune_defaults_replace_parser_defaults_but_not_yaml(tmp_path):
    cfg = write_yaml(tmp_path, "epochs: 11\n")
    args = parse_args(["-c", cfg], defaults={"epochs": 50, "lr": 1e-5})
    assert (args.epochs, args.lr) == (11, 1e-5)
    with pytest.raises(ConfigError, match="unknown default"):
        get_args_parser({"epoch": 1})


def test_parser_is_an_argparse_parser_with_deit_names():
    parser = get_args_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    strings = {s for a in parser._actions for s in a.option_strings}
    deit = ("--model --input-size --batch-size --epochs --lr --unscale-lr --opt --weight-decay --sched "
            "--warmup-epochs --warmup-lr --min-lr --drop --drop-path --smoothing --mixup --cutmix --mixup-prob "
            "--mixup-switch-prob --bce-loss --ThreeAugment --src --color-jitter --aa --reprob --repeated-aug "
            "--eval-crop-ratio --model-ema --data-path --data-set --output_dir --resume --eval --seed "
            "--num_workers").split()
    assert set(deit) <= strings


def test_simple_random_crop_defaults_on_for_small_images_only_and_can_be_forced():
    assert parse_args(["--input-size", "28"]).src is True  # DeiT crops images of 32 px or less with padding
    assert parse_args(["--input-size", "224"]).src is False  # RandomResizedCrop, as DeiT III on ImageNet
    assert parse_args(["--input-size", "28", "--no-src"]).src is False
    assert parse_args(["--input-size", "224", "--src"]).src is True
