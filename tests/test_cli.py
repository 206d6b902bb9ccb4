"""The command line a timm or DeiT user already knows: their spellings where the meaning is ours, ours named for
their other ones, and a bad command line told before torch and timm are imported."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import fresh_accelerate_state  # noqa: F401  (an autouse fixture)

import finetune
import train
from tract.config import ConfigError, parse_args

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("theirs,ours", [
    (["-b", "16"], ["--batch-size", "16"]),
    (["--img-size", "32"], ["--input-size", "32"]),
    (["--input-size", "3", "32", "32"], ["--input-size", "32", "--in-chans", "3"]),  # timm's C H W
    (["--input-size", "1", "32", "32"], ["--input-size", "32", "--in-chans", "1"]),
    (["--workers", "2"], ["--num-workers", "2"]),
    (["-j", "2"], ["--num-workers", "2"]),
    (["--num-classes", "10"], ["--nb-classes", "10"]),  # timm's and DeiT's, one option
    (["--amp"], ["--mixed-precision", "fp16"]),  # timm's --amp: float16 autocast with a grad scaler
    (["--amp", "--amp-dtype", "bfloat16"], ["--mixed-precision", "bf16"]),
    (["--initial-checkpoint", "w.pth"], ["--finetune", "w.pth"]),
    (["--pretrained-path", "w.pth"], ["--finetune", "w.pth"]),
    (["--grad-accum-steps", "4"], ["--accum-steps", "4"]),
    (["--crop-pct", "0.875"], ["--eval-crop-ratio", "0.875"]),
    (["--data-dir", "d"], ["--data-path", "d"]),
])
def test_timm_and_deit_spellings_mean_what_ours_mean(theirs, ours):
    assert vars(parse_args(theirs)) == vars(parse_args(ours))


def test_num_classes_and_input_size_of_timm_land_where_ours_do():
    args = parse_args(["--nb-classes", "10", "--input-size", "1", "64", "64"])
    assert (args.num_classes, args.in_chans, args.input_size) == (10, 1, 64)
    with pytest.raises(SystemExit):
        parse_args(["--input-size", "3", "32", "48"])  # not square


def timm_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        parse_args(list(argv), prog="train.py")
    assert e.value.code == 2
    return capsys.readouterr().err.splitlines()[0]


@pytest.mark.parametrize("flag,answer", [
    ("--pretrained", "(here: --finetune WEIGHTS (timm's --pretrained downloads"),
    ("--clip-mode", "(here: --clip-grad NORM"),
    ("--dataset", "(here: --data-set"),
    ("--interpolation", "(here: --train-interpolation"),
    ("--lr-base", "(here: --lr (DeiT's rule"),
])
def test_timms_other_flags_are_answered_with_ours_not_with_the_closest_spelling(capsys, flag, answer):
    line = timm_error(capsys, flag, "x")
    assert line.startswith(f"train.py: error: unrecognized arguments: {flag} {answer}"), line


def python_x_importtime(*argv):
    """Run a script with -X importtime; (exit status, stderr without the import lines, the modules imported)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    imported = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:.*\|\s+(\S+)$", out.stderr, flags=re.M)}
    told = [line for line in out.stderr.splitlines() if not line.startswith("import time:")]
    return out.returncode, told, imported


@pytest.mark.parametrize("argv,status,told", [
    (["train.py", "--epoch", "1"], 2, "train.py: error: unrecognized arguments: --epoch (did you mean --epochs?)"),
    (["train.py", "--lr", "-1"], 1, "train.py: error: --lr must be > 0, got -1.0"),
    (["train.py", "--global-batch", "30", "--batch-size", "8"], 0, None),  # a good command line goes on to torch
    (["finetune.py", "--data-path", "d"], 2, "finetune.py: error: the following arguments are required: --finetune"),
    (["finetune.py", "--finetune", "w.pth", "--amp-dtype", "half"], 2, "finetune.py: error: argument --amp-dtype"),
])
def test_a_bad_command_line_is_told_before_torch_and_timm_are_imported(argv, status, told):
    if status == 0:
        argv = [*argv, "--data-path", "/nonexistent", "--dry-run"]  # refused later, on the data, after the imports
    code, lines, imported = python_x_importtime(*argv)
    if told is None:
        assert code == 1 and "torch" in imported  # the control: the check does see torch when it is imported
        return
    assert code == status and lines[0].startswith(told), lines
    assert not {"torch", "timm", "accelerate", "torchvision", "numpy"} & imported


def test_num_classes_given_must_be_the_datasets(tiny_imagefolder, capsys):
    run = ["--data-set", "FOLDER", "--data-path", str(tiny_imagefolder), "--batch-size", "4", "--num-workers", "0",
           "--dry-run"]
    train.main([*run, "--nb-classes", "3"])
    assert "  classes: 3" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--num-classes 1000, but FOLDER at .* has 3 classes, which the head always "
                                          "predicts: leave --num-classes out"):
        train.main([*run, "--num-classes", "1000"])


def printed_output(capsys):
    return re.search(r"^  output: (.*)$", capsys.readouterr().out, flags=re.M).group(1)


def test_the_run_folder_is_timms_output_train_experiment_and_a_finetune_goes_to_finetune(tiny_imagefolder, tmp_path,
                                                                                          capsys):
    run = ["--data-set", "FOLDER", "--data-path", str(tiny_imagefolder), "--batch-size", "4", "--num-workers", "0",
           "--dry-run"]
    train.main([*run, "--output", str(tmp_path), "--experiment", "mine"])
    assert printed_output(capsys) == str(tmp_path / "train" / "mine")
    train.main(run)
    assert re.fullmatch(r"output/train/\d{8}-\d{6}-vit_pico_convstem_28-28", printed_output(capsys))
    import timm
    from safetensors.torch import save_file

    import tract.models  # noqa: F401  (registers vit_pico_patch7_28)

    weights = tmp_path / "weights.safetensors"
    save_file(timm.create_model("vit_pico_patch7_28", num_classes=3).state_dict(), weights)
    finetune.main([*run, "--finetune", str(weights), "--model", "vit_pico_patch7_28", "--input-size", "28"])
    assert re.fullmatch(r"output/finetune/\d{8}-\d{6}-vit_pico_patch7_28-28", printed_output(capsys))
