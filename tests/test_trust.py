"""What a shared cluster does to a run: kills at any point, damaged and malicious checkpoints, two runs in one
folder, signals during start-up, non-finite weights, bad images, a full disk, and bad input of every kind."""
import builtins
import errno
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train import fresh_accelerate_state, log_lines, tiny_run  # noqa: F401  (fresh_accelerate_state: autouse)

import train
import tract.data
from tract.checkpoint import CheckpointError, resolve_resume
from tract.errors import ConfigError, DatasetError
from tract.run_lock import RunLock
from tract.runtime import EXIT_REQUEUE

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("epoch_time", "images_per_sec", "time")


class WritesAFile:
    """A pickle whose loading would create a file: proof that it ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def record(out: Path):
    """log.txt without the timing fields, which differ between any two runs."""
    return [{k: v for k, v in line.items() if k not in TIMING} for line in log_lines(out)]


def rewrite_manifest(folder: Path) -> None:
    """Make the manifest match the folder's files again, as someone handing over a doctored checkpoint would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                         for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def two_epoch_run(tiny_imagefolder, tmp_path_factory):
    """A finished 2-epoch run keeping both epoch checkpoints, its command, and its folder (copied per test)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    argv = tiny_run(tiny_imagefolder, out, "--epochs", "2", "--tract", "--checkpoint-hist", "2", "--model-ema",
                    "--model-ema-decay", "0.9")
    train.main(argv)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out, argv


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    args = yaml.safe_load((dst / "args.yaml").read_text())
    args["output_dir"] = str(dst)
    (dst / "args.yaml").write_text(yaml.safe_dump(args))
    return dst


def resume_argv(argv, out):
    i = argv.index("--output-dir")
    return [*argv[:i], "--output-dir", str(out), *argv[i + 2:], "--resume", str(out)]


# ---- nothing in a checkpoint runs code ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
                                  "custom_checkpoint_1.pkl", "scaler.pt", "pytorch_model.bin"])
def test_a_malicious_pickle_in_a_checkpoint_never_runs_whatever_its_name(two_epoch_run, tmp_path, name, capsys):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    marker = tmp_path / "ran.txt"
    newest = out / "checkpoints" / "epoch-0002"
    torch.save({"state": WritesAFile(marker)}, newest / name)
    rewrite_manifest(newest)  # a consistent manifest: the loader itself must refuse
    argv = resume_argv(two_epoch_run[1], out) + ["--epochs", "3"]
    train.main(argv)
    said = capsys.readouterr().out
    if name in ("optimizer.bin", "random_states_0.pkl"):  # files a checkpoint is read from: refused, named, fallen back
        assert re.search(f"skipped refusing to load .*{name}.*nothing in it was run", said)
        assert "resumed from " + str(newest.parent / "epoch-0001") in said
    else:  # files train.py never reads: ignored
        assert "resumed from " + str(newest) in said
    assert len(log_lines(out)) == 3
    assert not marker.exists()


def test_eval_and_finetune_resume_read_checkpoints_the_same_safe_way(two_epoch_run, tmp_path):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    marker = tmp_path / "ran.txt"
    newest = out / "checkpoints" / "epoch-0002"
    torch.save({"state": WritesAFile(marker)}, newest / "optimizer.bin")
    rewrite_manifest(newest)
    with pytest.raises(CheckpointError, match="refusing to load"):  # named: no fallback
        train.main([*resume_argv(two_epoch_run[1], out)[:-1], str(newest), "--eval"])
    import finetune

    with pytest.raises(CheckpointError, match="refusing to load"):
        finetune.main([*resume_argv(two_epoch_run[1], out)[:-1], str(newest), "--eval"])
    assert not marker.exists()


# ---- damaged checkpoints: detected, the newest intact one used -------------------------------------------------

FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "train_state.json", "ema.safetensors",
         "manifest.json"]


@pytest.mark.parametrize("damage", ["truncate", "zero", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason_for_the_previous_intact_one(two_epoch_run, tmp_path,
                                                                                           name, damage):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    path = out / "checkpoints" / "epoch-0002" / name
    size = path.stat().st_size
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: size // 2])
    elif damage == "zero":
        path.write_bytes(bytes(size))
    else:
        path.unlink()
    notes = []
    checkpoint, run = resolve_resume(str(out), log=notes.append)
    assert checkpoint == (out / "checkpoints" / "epoch-0001").resolve() and run == out.resolve()
    assert len(notes) == 1 and "epoch-0002" in notes[0]
    with pytest.raises(CheckpointError, match=f"epoch-0002.*{'manifest.json' if name == 'manifest.json' else name}"):
        resolve_resume(str(out / "checkpoints" / "epoch-0002"))  # named explicitly: one error naming the file


def test_resume_after_damage_falls_back_and_finishes_bitwise_the_uninterrupted_run(two_epoch_run, tmp_path, capsys):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    for p in (out / "checkpoints" / "epoch-0002").iterdir():
        p.unlink()  # an emptied folder
    (out / "model.safetensors").unlink()
    train.main(resume_argv(two_epoch_run[1], out))
    assert "skipped" in capsys.readouterr().out
    assert same_weights(out / "model.safetensors", two_epoch_run[0] / "model.safetensors")
    assert record(out) == record(two_epoch_run[0])


def test_no_intact_checkpoint_is_one_error_that_names_each_and_a_command_that_restarts(two_epoch_run, tmp_path):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    for name in ("epoch-0001", "epoch-0002"):
        (out / "checkpoints" / name / "optimizer.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"epoch-0002.*epoch-0001.*--output-dir .*-restart and without --resume"):
        resolve_resume(str(out))


def test_resume_without_this_process_random_state_is_refused_unless_inexact_is_asked(two_epoch_run, tmp_path,
                                                                                      capsys):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    newest = out / "checkpoints" / "epoch-0002"
    (newest / "random_states_0.pkl").rename(newest / "random_states_1.pkl")  # as if written by process 1 of 2
    rewrite_manifest(newest)
    argv = resume_argv(two_epoch_run[1], out) + ["--epochs", "3"]
    with pytest.raises(CheckpointError, match="no random state for process 0.*--resume-inexact"):
        train.main(argv)
    train.main(argv + ["--resume-inexact"])
    assert "no longer exact" in capsys.readouterr().out and len(log_lines(out)) == 3


# ---- kills at every point of the epoch's end ----------------------------------------------------------------------

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch, train, tract.checkpoint, tract.config, tract.run_log
owner, name, n = {owner}, {name!r}, {n}
original, calls = getattr(owner, name), [0]
def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), {sig})
    return original(*args, **kwargs)
setattr(owner, name, killing)
train.cli(sys.argv[1:])
"""
# (where, the function entered, its n-th call): inside a save (train state written, manifest not), after the rename
# before `last`, before pruning, inside the evaluation, before `best`, before the log line, before the weights export.
KILL_POINTS = [("tract.checkpoint", "_write_json", 1), ("tract.checkpoint", "_write_json", 2),
               ("tract.checkpoint", "relink", 1), ("tract.checkpoint", "_prune", 2), ("tract.engine", "evaluate", 1),
               ("tract.engine", "repair_links", 1), ("tract.run_log.RunLog", "write", 2),
               ("tract.export", "export_weights", 1)]


def run_script(argv, *, script=None, check=True):
    code = script if script is not None else f"import sys; sys.path.insert(0, {str(ROOT)!r}); import train; train.cli()"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def killed_reference(tiny_imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("killref") / "run"
    argv = tiny_run(tiny_imagefolder, out, "--epochs", "2", "--tract", "--model-ema", "--model-ema-decay", "0.9")
    run_script(argv)
    return out, argv


@pytest.mark.parametrize("owner,name,n", KILL_POINTS)
def test_kill_9_at_any_point_then_resume_gives_bitwise_the_run_its_log_and_its_best(killed_reference, tmp_path,
                                                                                     owner, name, n):
    reference, argv = killed_reference
    out = tmp_path / "run"
    i = argv.index("--output-dir")
    argv = [*argv[:i], "--output-dir", str(out), *argv[i + 2:]]
    script = KILLER.format(root=str(ROOT), owner=owner, name=name, n=n, sig=int(signal.SIGKILL))
    killed = run_script(argv, script=script, check=False)
    assert killed.returncode == -signal.SIGKILL
    run_script([*argv, "--resume", str(out)])
    assert same_weights(out / "model.safetensors", reference / "model.safetensors")
    assert same_weights(out / "ema" / "model.safetensors", reference / "ema" / "model.safetensors")
    assert record(out) == record(reference)
    best = max(log_lines(out), key=lambda line: line["test_acc1"])["epoch"]
    assert os.readlink(out / "checkpoints" / "best") == f"epoch-{best:04d}"
    assert os.readlink(out / "checkpoints" / "last") == "epoch-0002"


# ---- one run per folder -------------------------------------------------------------------------------------------

def test_a_second_run_or_a_resume_into_a_live_run_folder_is_refused_naming_host_and_process(two_epoch_run, tmp_path,
                                                                                              tiny_imagefolder):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    holder = RunLock(out).acquire()
    try:
        who = f"process {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(ConfigError, match=f"in use by {who}"):
            train.main(resume_argv(two_epoch_run[1], out) + ["--epochs", "3"])
        fresh = tmp_path / "fresh"
        other = RunLock(fresh).acquire()
        with pytest.raises(ConfigError, match="in use by"):
            train.main(tiny_run(tiny_imagefolder, fresh))
        other.release()
    finally:
        holder.release()
    assert len(log_lines(out)) == 2  # untouched


def test_a_lock_is_released_by_the_os_when_its_holder_is_killed(tmp_path):
    code = (f"import sys, os, signal, time; sys.path.insert(0, {str(ROOT)!r}); from tract.run_lock import RunLock; "
            f"RunLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "held" in proc.stdout and proc.returncode == -9
    RunLock(tmp_path / "run").acquire().release()


# ---- no dead ends -------------------------------------------------------------------------------------------------

def signal_during_start_up(monkeypatch, sig) -> None:
    """train.py's start-up (building its datasets) receives ``sig``, as from a cluster; monkeypatch.undo() ends it."""
    build = tract.data.build_dataset

    def build_and_signal(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return build(*args, **kwargs)

    monkeypatch.setattr(tract.data, "build_dataset", build_and_signal)


def test_sigterm_during_start_up_exits_75_and_resume_of_the_folder_runs_from_the_start(tiny_imagefolder, tmp_path,
                                                                                     monkeypatch, capsys):
    out = tmp_path / "run"
    signal_during_start_up(monkeypatch, signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_run(tiny_imagefolder, out))
    assert e.value.code == EXIT_REQUEUE
    assert f"resume with --resume {out}" in capsys.readouterr().out
    monkeypatch.undo()
    train.main(tiny_run(tiny_imagefolder, out, "--resume", str(out)))
    assert (out / "model.safetensors").is_file() and len(log_lines(out)) == 1


def test_a_bad_training_image_is_named_and_the_folder_then_resumes(tiny_imagefolder, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, data)
    bad = data / "train" / "class_1" / "3.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        train.main(tiny_run(data, out))
    bad.write_bytes(good)
    with pytest.raises(ConfigError, match=f"--resume {out}"):
        train.main(tiny_run(data, out))
    train.main(tiny_run(data, out, "--resume", str(out)))
    assert len(log_lines(out)) == 1


def test_a_bad_validation_image_fails_after_the_epoch_checkpoint_which_keeps_the_training(tiny_imagefolder, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, data)
    bad = data / "val" / "class_0" / "1.png"
    bad.write_text("not a png")
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        train.main(tiny_run(data, out, "--num-workers", "1"))  # raised in a loader worker: still one line
    assert os.readlink(out / "checkpoints" / "last") == "epoch-0001"


def test_a_worker_error_reaches_the_user_as_its_one_line(tmp_path):
    from torch.utils.data import DataLoader, Dataset

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise DatasetError(f"cannot read image /x/{i}.png (OSError: truncated): replace or delete the file")

    with pytest.raises(DatasetError) as e:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(e.value) == "cannot read image /x/0.png (OSError: truncated): replace or delete the file"


def dataset_hook(monkeypatch, on_read):
    """train.py's training set calls on_read(n, (image, label)) at its n-th image read and returns what it returns
    (None: the sample unchanged)."""
    build = tract.data.build_dataset

    class Hooked(torch.utils.data.Dataset):
        def __init__(self, dataset):
            self.dataset, self.reads = dataset, 0

        def __len__(self):
            return len(self.dataset)

        def __getitem__(self, i):
            self.reads += 1
            sample = self.dataset[i]
            changed = on_read(self.reads, sample)
            return sample if changed is None else changed

    def build_hooked(name, root, is_train, *args, **kwargs):
        dataset, classes = build(name, root, is_train, *args, **kwargs)
        return (Hooked(dataset) if is_train else dataset), classes

    monkeypatch.setattr(tract.data, "build_dataset", build_hooked)


def test_non_finite_weights_are_never_checkpointed_and_the_last_good_one_is_named(tiny_imagefolder, tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "run"
    train.main(tiny_run(tiny_imagefolder, out))  # epoch-0001, good
    def nan_then_signal(n, sample):
        if n == 12:
            os.kill(os.getpid(), signal.SIGUSR1)  # preempted at update 3, after NaN at update 2
        image, label = sample
        return (image * float("nan") if n > 4 else image), label

    dataset_hook(monkeypatch, nan_then_signal)
    with pytest.raises(FloatingPointError, match=r"not finite.*nothing was saved.*epoch-0001"):
        train.main(tiny_run(tiny_imagefolder, out, "--epochs", "2", "--resume", str(out)))
    assert os.readlink(out / "checkpoints" / "last") == "epoch-0001"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if not p.is_symlink()) == ["epoch-0001"]


def test_a_full_disk_is_one_message_naming_the_folder_and_free_space_and_keeps_the_previous_checkpoint(
        tiny_imagefolder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(tiny_run(tiny_imagefolder, out))
    from accelerate import Accelerator

    def full(self, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Accelerator, "save_state", full)
    message = (r"cannot write checkpoint epoch-0002 in .*checkpoints: No space left on device \(.* GiB free on that "
               r"disk\); the previous checkpoint .*epoch-0001 is intact")
    with pytest.raises(CheckpointError, match=message):
        train.main(tiny_run(tiny_imagefolder, out, "--epochs", "2", "--resume", str(out)))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "epoch-0001", "last"]


def test_a_moved_run_folder_continues_where_it_now_is(tiny_imagefolder, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    train.main(tiny_run(tiny_imagefolder, old))
    old.rename(new)
    train.main(["-c", str(new / "args.yaml"), "--resume", str(new), "--epochs", "2"])
    assert not old.exists() and len(log_lines(new)) == 2


# ---- bad input: one message before compute, nothing written --------------------------------------------------------

def _yaml(tmp_path, **values):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-c", str(path)]


BAD_INPUTS = {
    "in-chans 2": (["--in-chans", "2"], "--in-chans must be 1"),
    "one beta": (["--opt-betas", "0.9"], "--opt-betas takes 2 values"),
    "negative clip": (["--clip-grad", "-1"], "--clip-grad must be > 0"),
    "ema decay 2": (["--model-ema", "--model-ema-decay", "2"], r"--model-ema-decay must be in \(0, 1\)"),
    "patch does not divide": (["--input-size", "36"], "not a multiple of the patch size 8"),
    "unknown aa policy": (["--aa", "bogus-m9"], "--aa bogus-m9: timm cannot read"),
    "negative momentum": (["--momentum", "-1"], r"--momentum must be in \[0, 1\]"),
    "step decay 0": (["--sched", "step", "--decay-rate", "0"], "--decay-rate in"),
    "cutmix min > max": (["--cutmix-minmax", "0.9", "0.1"], "0 < MIN <= MAX <= 1"),
    "seed past 32 bits": (["--seed", str(2**40)], "--seed must be < 2"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_is_one_message_and_writes_nothing(tiny_imagefolder, tmp_path, case):
    extra, message = BAD_INPUTS[case]
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train.main(tiny_run(tiny_imagefolder, out, *extra))
    assert not out.exists()


@pytest.mark.parametrize("values,message", [({"lr": [1, 2]}, "key 'lr' takes one value"),
                                            ({"epochs": 2.5}, "key 'epochs' must be a whole number"),
                                            ({"epochs": True}, "key 'epochs' must be a number"),
                                            ({"batch_size": None}, "key 'batch_size' needs a value")])
def test_a_bad_yaml_value_is_one_message_and_creates_no_folder(tiny_imagefolder, tmp_path, values, message):
    out = tmp_path / "run"
    argv = tiny_run(tiny_imagefolder, out)
    i = argv.index("--batch-size")
    with pytest.raises(ConfigError, match=message):
        train.main([*_yaml(tmp_path, **values), *argv[:i], *argv[i + 2:]])
    assert not out.exists()


def test_an_output_dir_that_is_a_file_or_under_a_file_is_refused(tiny_imagefolder, tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        train.main(tiny_run(tiny_imagefolder, afile))
    with pytest.raises(ConfigError, match="lies under .*notes.txt, which is a file"):
        train.main(tiny_run(tiny_imagefolder, afile / "run"))
    assert afile.read_text() == "mine"


def test_resume_with_another_architecture_is_refused_before_compute_naming_the_command(two_epoch_run, tmp_path):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    argv = resume_argv(two_epoch_run[1], out)
    i = argv.index("embed_dim=32")
    with pytest.raises(ConfigError, match=r"--model-kwargs .*would change what the run computes.*python train.py "
                                          r"--resume .*--resume-override"):
        train.main([*argv[:i], "embed_dim=64", *argv[i + 1:]])
    with pytest.raises(ConfigError, match=r"started with model_kwargs=.*only fit that; leave them out \(--resume "):
        train.main([*argv[:i], "embed_dim=64", *argv[i + 1:], "--resume-override"])  # the tensors cannot change


def test_a_text_file_or_image_as_weights_is_refused_without_torchs_unsafe_advice(tmp_path):
    from tract.errors import WeightsError
    from tract.weights import load_state_dict

    for name, content in (("notes.pth", b"hello\n" * 20), ("image.png", b"\x89PNG\r\n\x1a\n" + bytes(64))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError) as e:
            load_state_dict(tmp_path / name)
        assert "weights_only=False" not in str(e.value) and "issue" not in str(e.value)


def test_warmup_longer_than_the_run_is_a_warning_not_an_error(capsys):
    from tract.config import parse_args

    parse_args(["--warmup-epochs", "10", "--epochs", "1"])
    assert "never leaves its warmup" in capsys.readouterr().err


def test_a_finetune_stopped_before_its_first_checkpoint_resumes_from_its_pretrained_weights(two_epoch_run, tmp_path,
                                                                                         monkeypatch, capsys):
    import finetune

    pretrained, argv = two_epoch_run
    data = argv[argv.index("--data-path") + 1]
    out = tmp_path / "ft"
    command = ["--finetune", str(pretrained), "--data-set", "FOLDER", "--data-path", data, "--input-size", "32",
               "--batch-size", "4", "--epochs", "1", "--num-workers", "0", "--no-progress", "--output-dir", str(out)]
    signal_during_start_up(monkeypatch, signal.SIGUSR1)
    with pytest.raises(SystemExit) as e:
        finetune.main(command)
    assert e.value.code == EXIT_REQUEUE
    monkeypatch.undo()
    capsys.readouterr()
    # what a requeued SLURM job runs: the same command with --resume instead of --finetune; the run's args.yaml has them
    finetune.main([*command[2:], "--resume", str(out)])
    assert f"loaded pretrained weights from {pretrained}" in capsys.readouterr().out
    assert len(log_lines(out)) == 1


# ---- planted links: nothing outside the run folder is written ------------------------------------------------------

def with_output(argv, out):
    i = argv.index("--output-dir")
    return [*argv[:i], "--output-dir", str(out), *argv[i + 2:]]


def plant(out: Path, name: str, target: Path) -> None:
    path = out / name
    if path.is_dir() and not path.is_symlink():
        import shutil

        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    path.symlink_to(target)


def snapshot(folder: Path):
    """Every file under folder with its bytes: what an outside write would change."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# (name planted in the run folder, what it links to): a file or a folder of someone else's.
PLANTED = [("run.lock", "file"), (".log.txt.tmp", "file"), ("log.txt", "file"), ("checkpoints", "checkpoints"),
           ("checkpoints/.tmp-epoch-0003", "folder"), (".model.safetensors.tmp", "file"),
           ("checkpoints/last", "folder")]


@pytest.mark.parametrize("name,kind", PLANTED)
def test_a_planted_link_in_a_run_folder_is_refused_naming_it_and_nothing_outside_is_written(two_epoch_run, tmp_path,
                                                                                          name, kind):
    import shutil

    out = copy_run(two_epoch_run[0], tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    shutil.copytree(two_epoch_run[0] / "checkpoints", elsewhere / "checkpoints", symlinks=True)
    target = {"file": elsewhere / "notes.txt", "folder": elsewhere, "checkpoints": elsewhere / "checkpoints"}[kind]
    before = snapshot(elsewhere)
    plant(out, name, target)
    with pytest.raises(ConfigError, match=f"{out / name} is a link to {target}"):
        train.main(resume_argv(two_epoch_run[1], out) + ["--epochs", "3"])
    assert snapshot(elsewhere) == before
    assert sorted(os.listdir(elsewhere / "checkpoints")) == sorted(os.listdir(two_epoch_run[0] / "checkpoints"))


def test_a_run_folder_that_is_a_link_and_a_hard_linked_lock_are_refused(two_epoch_run, tmp_path):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    alias = tmp_path / "alias"
    alias.symlink_to(out)
    with pytest.raises(ConfigError, match=f"{alias} is a link to {out}.*--resume {out}"):
        train.main(resume_argv(two_epoch_run[1], alias) + ["--epochs", "3"])
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    (out / "run.lock").unlink()
    os.link(other, out / "run.lock")
    with pytest.raises(ConfigError, match="run.lock is not a plain file of the run"):
        train.main(resume_argv(two_epoch_run[1], out) + ["--epochs", "3"])
    assert other.read_text() == "mine" and len(log_lines(out)) == 2


# ---- one timeline per run -------------------------------------------------------------------------------------------

def test_rewinding_a_run_into_itself_is_refused_unless_asked_then_the_later_timeline_is_moved_aside(two_epoch_run,
                                                                                                  tmp_path, capsys):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    argv = [*resume_argv(two_epoch_run[1], out)[:-1], str(out / "checkpoints" / "epoch-0001")]
    with pytest.raises(ConfigError, match=r"would rewind the run .* to epoch-0001.*epoch-0002.*logged epochs \(2\).*"
                                          r"--rewind"):
        train.main(argv)
    assert len(log_lines(out)) == 2
    train.main(argv + ["--rewind"])
    aside = [p for p in out.iterdir() if p.name.startswith("rewound-")]
    assert len(aside) == 1 and f"in {aside[0]}" in capsys.readouterr().out
    assert os.listdir(aside[0] / "checkpoints") == ["epoch-0002"]
    assert [line["epoch"] for line in log_lines(aside[0])] == [1, 2]  # epochs numbered from 1
    # the epoch trained again is the uninterrupted run's: one timeline, nothing mixed
    assert record(out) == record(two_epoch_run[0])
    assert same_weights(out / "model.safetensors", two_epoch_run[0] / "model.safetensors")


def test_resume_follows_last_not_a_newer_checkpoint_of_another_timeline(two_epoch_run, tmp_path, capsys):
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    stale = out / "checkpoints" / "epoch-0002"
    weights = load_file(stale / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: torch.zeros_like(v) for k, v in weights.items()}, str(stale / "model.safetensors"))
    rewrite_manifest(stale)  # intact, but not this timeline's: `last` does not point to it
    os.remove(out / "checkpoints" / "last")
    os.symlink("epoch-0001", out / "checkpoints" / "last")
    lines = (out / "log.txt").read_text().splitlines()
    (out / "log.txt").write_text(lines[0] + "\n")
    train.main(resume_argv(two_epoch_run[1], out))
    assert "not using epoch-0002" in capsys.readouterr().out
    assert same_weights(out / "model.safetensors", two_epoch_run[0] / "model.safetensors")
    assert record(out) == record(two_epoch_run[0])


@pytest.mark.parametrize("then", ["deleted", "replaced by another run"])
def test_a_run_whose_folder_is_deleted_while_it_trains_stops_with_one_message_and_writes_nothing(
        tiny_imagefolder, tmp_path, monkeypatch, then):
    import shutil

    from tract.run_lock import RunFolderLost

    out = tmp_path / "run"

    def remove(n, sample):
        if n == 10:
            shutil.rmtree(out)
            if then != "deleted":  # what `--resume out` of a second run makes: the folder and its own lock
                out.mkdir()
                (out / "run.lock").write_text("{}")

    dataset_hook(monkeypatch, remove)
    with pytest.raises(RunFolderLost, match=f"{out} was deleted or replaced while this run was writing there"):
        train.main(tiny_run(tiny_imagefolder, out))
    if then == "deleted":
        assert not out.exists()
    else:
        assert os.listdir(out) == ["run.lock"] and (out / "run.lock").read_text() == "{}"


# ---- the log after a resume mid-epoch is the uninterrupted run's ----------------------------------------------------

def tensorboard_scalars(out: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# kill -9 in the first epoch after its update-2 checkpoint; SIGTERM at update 3 of the second (its first logged)
@pytest.mark.parametrize("sig,n", [(signal.SIGKILL, 4), (signal.SIGTERM, 9)])
def test_a_run_stopped_mid_epoch_then_resumed_logs_the_uninterrupted_runs_lines(killed_reference, tmp_path, sig, n):
    reference, argv = killed_reference
    out = tmp_path / "run"
    argv = with_output(argv, out) + ["--checkpoint-interval-updates", "2"]  # a kill -9 resumes from update 2
    script = KILLER.format(root=str(ROOT), owner="torch.optim.AdamW", name="step", n=n, sig=int(sig))
    stopped = run_script(argv, script=script, check=False)  # the signal comes during the n-th optimizer step
    assert stopped.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else EXIT_REQUEUE), stopped.stderr[-2000:]
    run_script([*argv, "--resume", str(out)])
    assert record(out) == record(reference)
    assert tensorboard_scalars(out, "train/loss") == tensorboard_scalars(reference, "train/loss")
    assert same_weights(out / "model.safetensors", reference / "model.safetensors")
    assert same_weights(out / "ema" / "model.safetensors", reference / "ema" / "model.safetensors")


# ---- every file read from a run folder is bounded: a checkpoint beyond the bounds fails verification ---------------

def doctor_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def nested_manifest(folder):
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def overflowing_size(folder):
    text = (folder / "manifest.json").read_text()
    entry = json.loads(text)["files"]["optimizer.bin"]
    (folder / "manifest.json").write_text(text.replace(f'"bytes": {entry["bytes"]}', '"bytes": 1e999'))


def long_file_name(folder):
    doctor_manifest(folder, lambda m: m["files"].update({"x" * 5000: {"bytes": 1, "sha256": "0" * 64}}))


def link_to_a_huge_sparse_file(folder):
    huge = folder.parent.parent.parent / "sparse.bin"
    with open(huge, "wb") as f:
        f.truncate(1 << 36)  # 64 GiB of nothing: hashing it would take minutes
    (folder / "extra.bin").symlink_to(huge)
    doctor_manifest(folder, lambda m: m["files"].update({"extra.bin": {"bytes": 1 << 36, "sha256": "0" * 64}}))


def forged_state(**values):
    def forge(folder):
        state = json.loads((folder / "train_state.json").read_text())
        state.update(values)
        (folder / "train_state.json").write_text(json.dumps(state))
        rewrite_manifest(folder)
    return forge


BEYOND_BOUNDS = {
    "nested brackets": (nested_manifest, "manifest.json"),
    "bytes 1e999": (overflowing_size, "manifest.json"),
    "5000-character name": (long_file_name, "manifest.json"),
    "link to a sparse file": (link_to_a_huge_sparse_file, "extra.bin is a link"),
    "epoch 'x'": (forged_state(epoch="x"), "train_state.json.*epoch 'x' is not a count"),
    "epoch -5": (forged_state(epoch=-5), "train_state.json.*epoch -5 is not a count"),
    "epoch not the folder's": (forged_state(epoch=7, num_updates=99), "says epoch 7, .* name says epoch 2"),
    "update beyond the name": (forged_state(update_in_epoch=50, num_updates=99), "says epoch 2, update 50"),
    "best acc NaN": (forged_state(best_acc1=float("nan")), "train_state.json"),
    "pending not numbers": (forged_state(pending={"train_loss": "x"}), "pending"),
}


@pytest.mark.parametrize("case", list(BEYOND_BOUNDS))
def test_a_newest_checkpoint_beyond_the_bounds_fails_verification_and_the_previous_one_is_used(two_epoch_run, tmp_path,
                                                                                              case):
    import time

    doctor, reason = BEYOND_BOUNDS[case]
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    doctor(out / "checkpoints" / "epoch-0002")
    notes = []
    start = time.monotonic()
    checkpoint, _ = resolve_resume(str(out), log=notes.append)
    assert checkpoint == (out / "checkpoints" / "epoch-0001").resolve()
    assert len(notes) == 1 and re.search(reason, notes[0]), notes
    assert time.monotonic() - start < 5  # measured: under 0.1 s each


@pytest.mark.parametrize("name,values", [("epoch-0099", {"epoch": 99, "num_updates": 600}),
                                         ("epoch-0001-update-000050", {"epoch": 1, "update_in_epoch": 50,
                                                                       "num_updates": 56})])
def test_a_consistent_forged_position_beyond_the_run_is_one_message(two_epoch_run, tmp_path, name, values):
    import shutil

    out = copy_run(two_epoch_run[0], tmp_path / "run")
    forged = out / "checkpoints" / name
    shutil.copytree(out / "checkpoints" / "epoch-0002", forged)
    forged_state(**values)(forged)
    os.remove(out / "checkpoints" / "last")
    os.symlink(name, out / "checkpoints" / "last")
    with pytest.raises(ConfigError, match=f"{name} is at update .* beyond this run's 2 epochs of 6 updates"):
        train.main(resume_argv(two_epoch_run[1], out))
    assert len(log_lines(out)) == 2


# ---- hostile YAML, images, disks: one message each ------------------------------------------------------------------

YAML_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # 9 ** 6 values once expanded, in 256 bytes
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcde", "bcdef")) + "lr: *f\n"
BAD_YAML = {"alias bomb": (YAML_BOMB, "expands to more than"),
            "python tag": ("lr: !!python/object/apply:os.system ['echo ran']\n", "is not plain YAML"),
            "syntax error": ("lr: [1, 2\nepochs: 3\n", "is not plain YAML")}


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_a_hostile_or_broken_args_yaml_is_one_message_naming_it(two_epoch_run, tmp_path, case):
    import finetune

    text, message = BAD_YAML[case]
    out = copy_run(two_epoch_run[0], tmp_path / "run")
    (out / "args.yaml").write_text(text)
    with pytest.raises(ConfigError, match=f"{out / 'args.yaml'} {message}.*--resume {out}"):
        train.main(resume_argv(two_epoch_run[1], out) + ["--epochs", "3"])
    with pytest.raises(ConfigError, match=f"{out / 'args.yaml'} {message}.*--finetune .*model.safetensors"):
        finetune.main(["--finetune", str(out), "--dry-run"])
    config = tmp_path / "config.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=f"{config} {message}") as e:
        train.main(["-c", str(config), "--dry-run"])
    assert len(str(e.value)) < 1000


def test_a_decompression_bomb_image_is_one_message_naming_it(tmp_path, monkeypatch):
    from PIL import Image

    from tract.data import read_image

    path = tmp_path / "bomb.png"
    Image.new("L", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: beyond twice the limit, as 20000 x 20000 is
    with pytest.raises(DatasetError, match=f"cannot read image {path}: .*decompression bomb.*smaller image or delete"):
        read_image(str(path))


def test_an_empty_class_folder_is_named_with_the_fix(tiny_imagefolder, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_imagefolder, data)
    for image in (data / "train" / "class_1").iterdir():
        image.unlink()
    empty = data / "train" / "class_1"
    with pytest.raises(DatasetError, match=f"(?s)class folder {empty} holds no images.*add images to it, or remove"):
        train.main(tiny_run(data, tmp_path / "run"))


FSIZE = """
import resource, signal, sys
sys.path.insert(0, {root!r})
import train
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
train.cli(sys.argv[1:])
"""


# per-file size limits that make the first failing write: args.yaml (start-up), a checkpoint's model.safetensors
# (mid-save, in safetensors; 80 kB, where the run's other files, TensorBoard's events included, stay under 20 kB until
# then); torch's way of failing is test_torchs_unexpected_pos_is_told_as_a_full_disk
@pytest.mark.parametrize("limit,what", [(500, "args.yaml"), (20000, "checkpoint epoch-0001")])
def test_a_full_disk_at_any_write_is_one_message_leaves_no_partial_file_and_the_run_then_finishes(
        killed_reference, tmp_path, limit, what):
    reference, argv = killed_reference
    out = tmp_path / "run"
    argv = with_output(argv, out)
    full = run_script(argv, script=FSIZE.format(root=str(ROOT), limit=limit), check=False)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert re.fullmatch(f"train.py: error: cannot write .*{what}.* then rerun the command.*\n", full.stderr)
    left = [p for p in out.rglob("*") if ".tmp" in p.name] if out.exists() else []
    assert left == [] and (not (out / "args.yaml").exists() or yaml.safe_load((out / "args.yaml").read_text()))
    again = argv + (["--resume", str(out)] if "with --resume" in full.stderr else [])
    run_script(again)
    assert record(out) == record(reference)


def fail_writes_to(monkeypatch, suffix: str) -> None:
    """A full disk for one file: fsync of a file whose name ends with suffix fails with ENOSPC."""
    fsync = os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(suffix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", full)


def test_a_full_disk_before_the_log_line_is_one_message_and_the_resume_logs_the_epoch(two_epoch_run, tmp_path,
                                                                                    monkeypatch):
    out = tmp_path / "run"
    argv = with_output(two_epoch_run[1], out)
    fail_writes_to(monkeypatch, "/log.txt")
    with pytest.raises(ConfigError, match=f"cannot write {out / 'log.txt'}: No space left on device.*--resume {out}"):
        train.main(argv)
    assert (out / "log.txt").read_text() == ""
    monkeypatch.undo()
    train.main([*argv, "--resume", str(out)])
    assert record(out) == record(two_epoch_run[0])


def test_a_full_disk_before_the_final_export_is_one_message_and_leaves_no_partial_file(two_epoch_run, tmp_path,
                                                                                     monkeypatch):
    import safetensors.torch

    out = copy_run(two_epoch_run[0], tmp_path / "run")
    (out / "model.safetensors").unlink()
    save = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if Path(filename).name == "model.safetensors" and "checkpoints" not in filename:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ConfigError, match=f"cannot write {out / 'model.safetensors'}: No space left.*--resume {out}"):
        train.main(resume_argv(two_epoch_run[1], out))
    assert not [p for p in out.iterdir() if p.name.startswith((".model.safetensors", "model.safetensors"))]
    monkeypatch.undo()
    train.main(resume_argv(two_epoch_run[1], out))
    assert same_weights(out / "model.safetensors", two_epoch_run[0] / "model.safetensors")


def test_torchs_unexpected_pos_is_told_as_a_full_disk(two_epoch_run, tmp_path, monkeypatch):
    from accelerate import Accelerator

    out = copy_run(two_epoch_run[0], tmp_path / "run")

    def torn(self, path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 110784 vs 110676")

    monkeypatch.setattr(Accelerator, "save_state", torn)
    with pytest.raises(CheckpointError, match=r"epoch-0003 in .*: No space left on device \(disk full\)"):
        train.main(resume_argv(two_epoch_run[1], out) + ["--epochs", "3"])
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


# ---- a kill at any point of the start-up leaves a folder that the message's command continues -----------------------

@pytest.mark.parametrize("owner,name", [("tract.run_folder", "save_args"), ("tract.data", "build_dataset")])
def test_a_kill_during_start_up_leaves_a_folder_the_told_command_continues(killed_reference, tmp_path, owner, name):
    reference, argv = killed_reference
    out = tmp_path / "run"
    argv = with_output(argv, out)
    script = KILLER.format(root=str(ROOT), owner=owner, name=name, n=1, sig=int(signal.SIGKILL))
    killed = run_script(argv, script=script, check=False)
    assert killed.returncode == -signal.SIGKILL and out.is_dir()
    if name == "save_args":  # killed between run.lock and args.yaml: --resume starts it from the beginning
        run_script([*argv, "--resume", str(out)])
    else:  # args.yaml written: the original command names the command that continues, which does
        again = run_script(argv, check=False)
        assert again.returncode == 1 and f"already holds a run: pass --resume {out}" in again.stderr
        run_script([*argv, "--resume", str(out)])
    assert record(out) == record(reference)
