"""A researcher's ordinary day with train.py (issue 16): resume by folder alone, Ctrl-C, progress in a log, exports
that timm loads, honest warnings and flags. Every test runs train.py / finetune.py end to end on tiny data."""
import os
import signal

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
