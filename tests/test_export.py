"""Exports: the last, best and EMA weights of a run, and any checkpoint through `python -m tract.export`, each a folder
that timm.create_model("local-dir:...") loads, checked against the accuracy and loss the run logged for those weights
(the loss tells apart weights whose accuracy on 12 images ties)."""
import subprocess
import sys
from pathlib import Path

import pytest
from test_daily import timm_accuracy
from test_train import fresh_accelerate_state, log_lines, tiny_run  # noqa: F401  (an autouse fixture)

import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_imagefolder, tmp_path_factory):
    """Three epochs with an evaluated EMA, every checkpoint kept; the run's last line."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("export") / "run"
    printed = io.StringIO()
    with redirect_stdout(printed):
        train.main(tiny_run(tiny_imagefolder, out, "--epochs", "3", "--lr", "1e-2", "--model-ema", "--model-ema-decay",
                            "0.9", "--model-ema-eval", "--checkpoint-hist", "3"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out, printed.getvalue().splitlines()[-1]


def logged(run_dir, epoch, prefix="test"):
    record = next(r for r in log_lines(run_dir) if r["epoch"] == epoch)
    return record[f"{prefix}_acc1"], record[f"{prefix}_loss"]


def test_the_best_last_and_ema_exports_load_in_timm_with_the_accuracy_the_run_logged_for_them(run, tiny_imagefolder):
    out, done = run
    records = log_lines(out)
    best = max(records, key=lambda r: r["test_acc1"])["epoch"]
    assert best != 3 and logged(out, best) != logged(out, 3)  # the test tells the best weights from the last
    val = tiny_imagefolder / "val"
    for folder, epoch, prefix in ((out / "best", best, "test"), (out, 3, "test"), (out / "ema", 3, "test_ema")):
        accuracy, loss, _ = timm_accuracy(folder, val)
        assert (accuracy, loss) == pytest.approx(logged(out, epoch, prefix), rel=1e-5), folder
    assert done == (f"done: the best weights (test_acc1 {logged(out, best)[0]:.2f}%, epoch {best}) in {out / 'best'}/; "
                    f"the last epoch's (test_acc1 {logged(out, 3)[0]:.2f}%, epoch 3) in {out}/; their EMA "
                    f"(test_ema_acc1 {logged(out, 3, 'test_ema')[0]:.2f}%, epoch 3) in {out / 'ema'}/. Each folder "
                    "is a model.safetensors with its config.json: timm.create_model(\"local-dir:FOLDER\", "
                    "pretrained=True)")


def export(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "tract.export", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("which", ["epoch-0002", "epoch-0002 --ema", "RUN"])
def test_python_m_tract_export_writes_any_checkpoint_as_a_folder_timm_loads(run, tiny_imagefolder, tmp_path, which):
    out, _ = run
    source = out if which == "RUN" else out / "checkpoints" / which.split()[0]
    done = export(source, tmp_path / "export", *which.split()[1:])
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    best = max(log_lines(out), key=lambda r: r["test_acc1"])["epoch"]
    epoch, prefix = (best, "test") if which == "RUN" else (2, "test_ema" if "--ema" in which else "test")
    accuracy, loss, _ = timm_accuracy(tmp_path / "export", tiny_imagefolder / "val")
    assert (accuracy, loss) == pytest.approx(logged(out, epoch, prefix), rel=1e-5)


def test_export_of_a_damaged_checkpoint_or_a_missing_ema_is_one_message(run, tmp_path):
    import json
    import shutil

    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, symlinks=True)
    (copy / "checkpoints" / "epoch-0001" / "model.safetensors").write_bytes(b"damaged")
    done = export(copy / "checkpoints" / "epoch-0001", tmp_path / "a")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("python -m tract.export: error: cannot export ")
    assert "the manifest says" in done.stderr
    # a checkpoint of a run without --model-ema: no ema.safetensors, and its manifest lists none
    manifest = copy / "checkpoints" / "epoch-0002" / "manifest.json"
    listing = json.loads(manifest.read_text())
    del listing["files"]["ema.safetensors"]
    manifest.write_text(json.dumps(listing))
    (copy / "checkpoints" / "epoch-0002" / "ema.safetensors").unlink()
    done = export(copy / "checkpoints" / "epoch-0002", tmp_path / "b", "--ema")
    assert done.returncode == 1 and "holds no EMA weights (the run was trained without --model-ema)" in done.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
