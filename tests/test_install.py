"""The project as installed by scripts/env.sh: `import tract` and the README's snippets work from any directory, not
only from the checkout (pytest itself runs from the checkout, so each check runs a fresh interpreter elsewhere)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_elsewhere(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """This environment's python, run in ``cwd`` with nothing on PYTHONPATH: it sees what is installed, not the
    checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_env_sh_installs_the_project_so_tract_imports_from_any_directory(tmp_path):
    out = python_elsewhere("import tract, tract.models; print(tract.__file__)", tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]  # ModuleNotFoundError: No module named 'tract' without the install
    assert Path(out.stdout.strip()) == REPO / "tract" / "__init__.py"  # editable: the checkout's own code
