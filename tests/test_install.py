"""The project as installed by scripts/env.sh: `import tract` and the snippets of the docs work from any directory, not
only from the checkout (pytest itself runs from the checkout, so each check runs a fresh interpreter elsewhere)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_elsewhere(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """This environment's python with ``args``, run in ``cwd`` with nothing on PYTHONPATH: it sees what is installed,
    not the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_env_sh_installs_the_project_so_tract_imports_from_any_directory(tmp_path):
    out = python_elsewhere(tmp_path, "-c", "import tract, tract.models; print(tract.__file__)")
    assert out.returncode == 0, out.stderr[-2000:]  # ModuleNotFoundError: No module named 'tract' without the install
    assert Path(out.stdout.strip()) == REPO / "tract" / "__init__.py"  # editable: the checkout's own code


def docs_snippet(page: str, marker: str) -> str:
    """The first ```python block of a page of the docs after ``marker``."""
    import re

    text = (REPO / page).read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(marker):], flags=re.S).group(1)


def test_the_inference_snippet_and_the_export_command_of_the_docs_run_from_another_directory(tiny_imagefolder,
                                                                                             tmp_path):
    import train
    from test_train import fresh_accelerate_state, tiny_run  # noqa: F401

    run = tmp_path / "run"
    train.main(tiny_run(tiny_imagefolder, run, "--model", "vit_pico_patch7_28", "--model-kwargs", "--input-size", "28"))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exported = python_elsewhere(elsewhere, "-m", "tract.export", str(run / "checkpoints" / "epoch-0001"), "exported")
    assert exported.returncode == 0, exported.stderr[-2000:]
    image = next((tiny_imagefolder / "val" / "class_1").iterdir())
    snippet = docs_snippet("docs/train.md", "Inference on one image:")
    assert '"local-dir:output/train/demo/best"' in snippet and '"image.png"' in snippet
    snippet = snippet.replace("output/train/demo/best", "exported").replace("image.png", str(image))
    out = python_elsewhere(elsewhere, "-c", snippet)
    assert out.returncode == 0, out.stderr[-2000:]
    label, probability = out.stdout.split()
    assert label in {"class_0", "class_1", "class_2"} and probability.endswith("%")
