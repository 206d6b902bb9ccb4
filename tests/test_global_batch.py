"""--global-batch: the global batch kept by train.py on whatever a launch has, not by launch scripts' arithmetic.

The layout is derived when the command line is parsed, from the processes the launcher started (WORLD_SIZE, which
train.py then checks against Accelerate's num_processes). Every config is checked under every launch config's process
count at that point (parse_args with WORLD_SIZE set); real CPU launches of 2 and 4 processes (launch/accelerate/
cpu.yaml with --num_processes, so no GPU is needed) dry-run configs of each family and train one update, checking the
derivation the dry run prints and the layout the run saves.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tract.config import ConfigError, parse_args
from tract.global_batch import batch_layout

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def fewest_steps(global_batch, max_per_process, processes):
    """Brute force over every (per-process batch, steps) pair whose product with the processes is the global batch."""
    pairs = [(global_batch // (processes * a), a) for a in range(1, global_batch + 1)
             if global_batch % (processes * a) == 0 and global_batch // (processes * a) <= max_per_process]
    return min(pairs, key=lambda pair: pair[1]) if pairs else None


def launch_process_counts():
    """The total process counts of launch/accelerate/*.yaml, the multi-node ones on 1, 2 and 4 machines (3 machines
    of 4 GPUs, 12 processes, cannot reach 2048: refused, below)."""
    counts = set()
    for path in (REPO / "launch" / "accelerate").glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        per_machine = cfg["num_processes"] // cfg["num_machines"]
        counts |= {per_machine * n for n in (1, 2, 4)} if cfg["num_machines"] > 1 else {cfg["num_processes"]}
    return sorted(counts)


@pytest.mark.parametrize("global_batch,max_per_process", [(2048, 256), (768, 192), (768, 96), (512, 64), (128, 128),
                                                          (256, 100), (48, 5)])
def test_layout_has_the_fewest_accumulation_steps_that_reach_the_global_batch_exactly(global_batch, max_per_process):
    for processes in range(1, 40):
        assert batch_layout(global_batch, max_per_process, processes) == fewest_steps(global_batch, max_per_process,
                                                                                      processes)


def test_the_launch_configs_cover_one_to_sixteen_processes():
    assert {1, 2, 4, 8, 16} <= set(launch_process_counts())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_config_keeps_its_global_batch_under_every_launch_configs_process_count(config, monkeypatch):
    values = yaml.safe_load(config.read_text())
    for processes in launch_process_counts():
        monkeypatch.setenv("WORLD_SIZE", str(processes))
        args = parse_args(["-c", str(config)])
        assert args.batch_size * processes * args.accum_steps == values["global_batch"]
        assert (args.batch_size, args.accum_steps) == fewest_steps(values["global_batch"], values["batch_size"],
                                                                   processes)


def test_a_process_count_that_cannot_reach_the_global_batch_is_refused_with_the_layouts_that_can(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "12")
    with pytest.raises(ConfigError) as e:
        parse_args(["-c", str(REPO / "configs" / "deit3_vit_s_400ep.yaml")])
    message = str(e.value)
    assert "--global-batch 2048 cannot be split evenly over the 12 processes launched" in message
    for layout in ("8 processes: 256 per process x 1 step", "16 processes: 128 per process x 1 step"):
        assert layout in message
    assert "--global-batch 0" in message


def test_accum_steps_on_the_command_line_must_agree_with_the_global_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    config = str(REPO / "configs" / "deit3_vit_s_400ep.yaml")
    assert parse_args(["-c", config, "--accum-steps", "2"]).accum_steps == 2  # what it derives anyway
    with pytest.raises(ConfigError, match="--accum-steps 1 contradicts --global-batch 2048: over 4 process"):
        parse_args(["-c", config, "--accum-steps", "1"])
    off = parse_args(["-c", config, "--accum-steps", "1", "--global-batch", "0"])
    assert (off.batch_size, off.accum_steps) == (256, 1)  # without a global batch, the flags as given


def test_without_global_batch_the_batch_is_the_flags_product():
    args = parse_args(["--batch-size", "32", "--accum-steps", "3"])
    assert (args.global_batch, args.batch_size, args.accum_steps) == (None, 32, 3)


# ---- real launches on the CPU ------------------------------------------------------------------------------------

def launch(processes, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PET_", "TORCH_ELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/cpu.yaml",
           "--num_processes", str(processes), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def printed(stdout, key):
    return re.findall(rf"^  {key}: (.*)$", stdout, flags=re.M)


def test_four_cpu_processes_dry_run_configs_of_each_family_with_the_steps_derived_from_four():
    families = ["deit3_vit_s_400ep", "deit3_vit_b_400ep_192", "imagenet_resnet50_30ep", "cifar10_vit_adam_100ep",
                "cifar100_resnet18_200ep"]
    # Fashion-MNIST's 60,000 images stand in for each config's dataset: enough for an update of 2048
    out = launch(4, "tests/dry_run_configs.py", *[f"configs/{name}.yaml" for name in families], "--",
                 "--data-set", "FMNIST", "--num-workers", "0")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = printed(out.stdout, "global batch")
    assert len(lines) == len(families)  # printed once per launch (the main process), not once per process
    for name, line in zip(families, lines):
        values = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
        batch, steps = fewest_steps(values["global_batch"], values["batch_size"], 4)
        assert line == (f"{values['global_batch']} = {batch} per process x 4 processes x {steps} accumulation "
                        f"step{'s' if steps > 1 else ''} (--global-batch {values['global_batch']}: the steps derived "
                        "from the processes launched)")
    assert printed(out.stdout, "processes") == ["4"] * len(families)


def test_four_cpu_processes_that_cannot_reach_the_global_batch_stop_before_building_anything_with_one_message():
    out = launch(4, "train.py", "--global-batch", "30", "--batch-size", "8", "--dry-run", "--num-workers", "0")
    assert out.returncode != 0
    told = [line for line in out.stderr.splitlines() if "--global-batch 30 cannot be split" in line]
    assert len(told) == 1 and "5 processes: 6 per process x 1 step;" in told[0]  # 30 = 6 x 5 x 1
    # no traceback through the project's code (the launcher prints its own; the venv may live inside the repository)
    assert f'File "{REPO}/tract/' not in out.stderr and f'File "{REPO}/train.py' not in out.stderr


def test_two_cpu_processes_train_one_update_of_the_global_batch_and_save_the_layout(tiny_imagefolder, tmp_path):
    run = tmp_path / "run"
    out = launch(2, "train.py", "--data-set", "FOLDER", "--data-path", str(tiny_imagefolder), "--model",
                 "vit_pico_patch7_28", "--input-size", "28", "--global-batch", "16", "--batch-size", "4", "--epochs",
                 "1", "--max-updates-per-epoch", "1", "--num-workers", "0", "--no-progress", "--output-dir", str(run))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert printed(out.stdout, "global batch") == [
        "16 = 4 per process x 2 processes x 2 accumulation steps (--global-batch 16: the steps derived from the "
        "processes launched)"]
    saved = yaml.safe_load((run / "args.yaml").read_text())
    assert (saved["global_batch"], saved["batch_size"], saved["accum_steps"]) == (16, 4, 2)
    assert (run / "checkpoints" / "last" / "random_states_1.pkl").is_file()
