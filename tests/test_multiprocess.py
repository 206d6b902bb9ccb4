"""Real multi-process launches on the CPU (DDP over gloo): 2 processes, 2 "machines" on loopback, a preemption.

Every run trains a tiny ViT (4x4 patches of 32-px images, TrAct on the first layer) for 4 epochs of 3 SGD updates
on 24 images, and is compared with one process training on the same global batches:
- Data order: train.py shards one seeded permutation per epoch with DistributedSampler, rank r taking every world-th
  index; with a per-process batch of 4 on 2 ranks, update k sees exactly the 8 images of the 1-process run's update k
  (batch 8). DDP averages the two half-batch mean gradients, which is the full-batch mean.
- Augmentation draws different random numbers in each process, so the images are uniform colours: every random
  crop, resize and flip of a uniform image gives the same pixels, and colour jitter is off. No mixup, cutmix, repeated
  augmentation, dropout or drop path: nothing else depends on the process count.
- TrAct's Gram matrix is a sum over the batch's rows; with --tract-sync-gram the processes all-reduce it, so it is the
  1-process Gram (without it each process would use its half, a different update).
What remains is floating-point reduction order: the float32 weights must agree to rtol 1e-5, atol 1e-6 (measured:
at most 1.2e-7 apart), while training moves them by more than 1e-3.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
TRAIN_ARGS = ["--data-set", "IMNET", "--model", "vit_pico_patch7_28", "--model-kwargs", "patch_size=4",
              "--input-size", "32", "--color-jitter", "0", "--opt", "sgd", "--lr", "0.05", "--unscale-lr",
              "--weight-decay", "0", "--epochs", str(EPOCHS), "--tract", "--tract-sync-gram", "--num-workers", "0",
              "--no-progress", "--seed", "0"]
# finetune.py's defaults turn on RandAugment, mixup and cutmix: off, for the same reason as above
FINETUNE_ARGS = ["--data-set", "IMNET", "--input-size", "32", "--color-jitter", "0", "--aa=", "--mixup", "0",
                 "--cutmix", "0", "--opt", "sgd", "--lr", "0.05", "--unscale-lr", "--weight-decay", "0",
                 "--epochs", "2", "--warmup-epochs", "0", "--tract-sync-gram", "--num-workers", "0", "--no-progress",
                 "--seed", "0"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def uniform_imagefolder(tmp_path_factory) -> Path:
    """DeiT-style ImageFolder, 3 classes x (8 train + 4 val) 32x32 PNGs, each image one colour near its class's."""
    from PIL import Image

    root = tmp_path_factory.mktemp("uniform")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            base = np.full(3, 60)
            base[c] = 200
            for i in range(n):
                colour = np.clip(base + rng.integers(-40, 41, size=3), 0, 255).astype(np.uint8)
                Image.fromarray(np.broadcast_to(colour, (32, 32, 3)).copy()).save(folder / f"{i}.png")
    return root


def launch_env() -> dict:
    """Environment of a CPU launch: accelerate on PATH, processes on the CPU, one thread each (2 cores here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "PET_", "TORCH_ELASTIC"))}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    return env


def run(cmd, cwd, check=True):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=launch_env(), capture_output=True, text=True,
                         timeout=TIMEOUT)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args):
    return [sys.executable, "-m", "accelerate.commands.launch", *args]


def multinode(*args):
    return [REPO / "launch" / "multinode.sh", "--config", REPO / "launch" / "accelerate" / "cpu.yaml", *args]


def weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(actual: Path, expected: Path):
    a, e = weights(actual), weights(expected)
    assert sorted(a) == sorted(e)
    for key in e:
        torch.testing.assert_close(a[key], e[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def max_change(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a.keys() & b.keys())


@pytest.fixture(scope="module")
def reference_run(uniform_imagefolder, tmp_path_factory) -> Path:
    """One process, per-process batch 8 = the global batch of the multi-process runs."""
    cwd = tmp_path_factory.mktemp("reference")
    run([sys.executable, REPO / "train.py", *TRAIN_ARGS, "--data-path", uniform_imagefolder, "--batch-size", "8",
         "--checkpoint-hist", str(EPOCHS), "--output-dir", "run"], cwd)
    return cwd / "run"


def test_two_processes_train_exactly_as_one_with_the_same_global_batch_and_write_one_run(
        reference_run, uniform_imagefolder, tmp_path):
    out = run(accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", "0", REPO / "train.py",
                                *TRAIN_ARGS, "--data-path", uniform_imagefolder, "--batch-size", "4",
                                "--output-dir", "run"), tmp_path)
    assert "processes: 2" in out.stdout and "global batch: 8" in out.stdout
    assert_same_weights(tmp_path / "run" / "model.safetensors", reference_run / "model.safetensors")
    first_epoch = weights(reference_run / "checkpoints" / "epoch-0001" / "model.safetensors")
    assert max_change(weights(reference_run / "model.safetensors"), first_epoch) > 1e-3

    # one run's outputs, written once: nothing else in the working folder, one log line per epoch, one event file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    run_dir = tmp_path / "run"
    names = sorted(p.name for p in run_dir.iterdir())
    assert [n for n in names if not n.startswith("events.out.tfevents")] == [
        "args.yaml", "best", "checkpoints", "config.json", "log.txt", "model.safetensors", "run.lock", "summary.csv"]
    assert len(names) == 9
    assert len((run_dir / "log.txt").read_text().splitlines()) == EPOCHS
    # both processes' RNG states in the one checkpoint, so a resumed 2-process run restores each of them
    assert sorted(p.name for p in (run_dir / "checkpoints" / "last").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]


def test_two_process_finetune_equals_one_process_finetune(reference_run, uniform_imagefolder, tmp_path):
    common = [REPO / "finetune.py", *FINETUNE_ARGS, "--data-path", uniform_imagefolder, "--finetune", reference_run]
    run([sys.executable, *common, "--batch-size", "8", "--output-dir", "one"], tmp_path)
    run(accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", "0", *common,
                          "--batch-size", "4", "--output-dir", "two"), tmp_path)
    assert_same_weights(tmp_path / "two" / "model.safetensors", tmp_path / "one" / "model.safetensors")
    assert max_change(weights(tmp_path / "one" / "model.safetensors"),
                      weights(reference_run / "model.safetensors")) > 1e-3


def test_two_machines_on_loopback_rendezvous_train_together_and_finish(reference_run, uniform_imagefolder, tmp_path):
    port = free_port()
    machines = [subprocess.Popen(
        [str(c) for c in multinode("--gpus-per-node", "1", "--nnodes", "2", "--machine-rank", str(rank),
                                   "--main-ip", "127.0.0.1", "--main-port", str(port), REPO / "train.py",
                                   *TRAIN_ARGS, "--data-path", uniform_imagefolder, "--batch-size", "4",
                                   "--output-dir", "run")],
        cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    logs = [m.communicate(timeout=TIMEOUT)[0] for m in machines]
    for m, log in zip(machines, logs):
        assert m.returncode == 0, log[-3000:]
    assert "processes: 2" in logs[0]
    assert_same_weights(tmp_path / "run" / "model.safetensors", reference_run / "model.safetensors")


def test_sigusr1_to_the_launcher_checkpoints_all_workers_and_resume_finishes_the_same_run(
        reference_run, uniform_imagefolder, tmp_path):
    # One loader worker per process: it shares the process group the agent signals and must survive SIGUSR1.
    def command(*extra):
        return [str(c) for c in multinode("--nnodes", "1", "--machine-rank", "0", "--main-ip", "127.0.0.1",
                                          "--main-port", str(free_port()), REPO / "train.py", *TRAIN_ARGS,
                                          "--data-path", uniform_imagefolder, "--batch-size", "4",
                                          "--num-workers", "1", "--output-dir", "run", *extra)]

    launcher = subprocess.Popen(command(), cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    first = tmp_path / "run" / "checkpoints" / "epoch-0001"  # written inside the loop: train.py catches USR1 by then
    deadline = time.monotonic() + TIMEOUT
    while not first.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    launcher.send_signal(signal.SIGUSR1)  # multinode.sh has become accelerate launch, the elastic agent
    log = launcher.communicate(timeout=TIMEOUT)[0]
    assert launcher.returncode != 0, "the run ended before the signal: " + log[-2000:]
    assert "Received 10 death signal" in log or "SIGUSR1" in log, log[-3000:]
    assert "exiting with 75 (resume with --resume run, e.g. python train.py --resume run)" in log, log[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last"
    assert last.is_symlink() and last.resolve().name != f"epoch-{EPOCHS:04d}"

    run(command("--resume", "run"), tmp_path)
    assert_same_weights(tmp_path / "run" / "model.safetensors", reference_run / "model.safetensors")


def launch_until_it_ends(cwd: Path, *args):
    """(output, exit status, seconds) of a 2-process launch of ``args``."""
    start = time.monotonic()
    out = run(accelerate_launch("--multi_gpu", "--num_processes", "2", "--main_process_port", "0", *args), cwd,
              check=False)
    return out.stdout + out.stderr, out.returncode, time.monotonic() - start


def test_a_non_finite_loss_on_one_process_stops_every_process_at_the_same_check_with_one_message(
        uniform_imagefolder, tmp_path):
    # Process 1's loss is NaN at update 2, a loss check (--sync-interval 2): process 0's own loss is still finite
    # there, so without agreement process 1 stops alone and process 0 waits in the next update's all-reduce.
    log, status, seconds = launch_until_it_ends(
        tmp_path, REPO / "tests" / "one_rank_fails.py", "1", "2", *TRAIN_ARGS,
        "--data-path", uniform_imagefolder, "--batch-size", "4", "--sync-interval", "2", "--output-dir", "run")
    assert status != 0
    assert log.count("train.py: loss is nan at update 2: training diverged") == 1, log[-3000:]
    # both stopped on the error, neither in a broken collective (the launcher's own traceback only names itself)
    assert 'train.py", line' not in log and "tract/" not in log.replace(str(REPO / "tests"), ""), log[-3000:]
    assert seconds < 90


def test_a_bad_image_met_by_one_process_is_told_by_it_and_ends_the_launch(uniform_imagefolder, tmp_path):
    import shutil

    from torch.utils.data import DistributedSampler

    data = tmp_path / "data"
    shutil.copytree(uniform_imagefolder, data)
    # An image of process 1's shard of the first epoch (train.py's sampler; ImageFolder orders class, then name):
    # process 0 never reads it, and process 1 is not the one that tells the machine's shared errors
    first = next(iter(DistributedSampler(range(24), 2, 1, shuffle=True, seed=0, drop_last=True)))
    bad = data / "train" / f"class_{first // 8}" / f"{first % 8}.png"
    bad.write_bytes(b"not a png")
    log, status, seconds = launch_until_it_ends(
        tmp_path, REPO / "train.py", *TRAIN_ARGS, "--data-path", data, "--batch-size", "4", "--output-dir", "run")
    assert status != 0
    assert log.count(f"train.py: error: cannot read image {bad}") == 1, log[-3000:]
    assert seconds < 90
