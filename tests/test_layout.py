"""The package keeps one direction: pyproject.toml's import-linter contract (tract's layers, each module importing only
the layers below it) holds, ruff's pyflakes rules find nothing, and the contract does catch an upward import.

Both tools run from the environment running the tests (``scripts/env.sh`` installs them from requirements.txt).
"""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")  # the console script beside this Python


def lint_imports(folder: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the ``tract`` package and pyproject.toml in ``folder`` (it puts its cwd first on the
    path, so the package analysed is that folder's)."""
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=folder, capture_output=True, text=True, timeout=120)


def package_copy(tmp_path: Path) -> Path:
    """The repository's tract/ and pyproject.toml, copied where a test may break them."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "tract", copy / "tract", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy)
    return copy


def test_every_tract_import_points_down_the_layers_of_pyproject_toml():
    result = lint_imports(ROOT)
    assert result.returncode == 0, f"an import breaks tract's layers (pyproject.toml):\n{result.stdout}{result.stderr}"
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_ruff_finds_no_unused_or_undefined_names():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"ruff check (pyproject.toml's rules):\n{result.stdout}{result.stderr}"


def test_an_upward_import_hidden_in_a_function_breaks_the_contract_naming_it(tmp_path):
    copy = package_copy(tmp_path)
    assert lint_imports(copy).returncode == 0  # the copy as it is keeps the contract
    # The checkpoint asking the run folder, as it did (inside a function) before the layers: a circle again.
    with open(copy / "tract" / "checkpoint.py", "a") as f:
        f.write("\n\ndef _upward():\n    from tract.run_folder import place_run\n\n    return place_run\n")
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "tract.checkpoint -> tract.run_folder" in result.stdout, result.stdout
    assert "Contracts: 1 kept, 1 broken." in result.stdout, result.stdout


def test_a_new_module_outside_the_layers_breaks_the_contract_naming_it(tmp_path):
    copy = package_copy(tmp_path)
    (copy / "tract" / "helpers.py").write_text('"""A module no layer names."""\n')
    result = lint_imports(copy)
    assert result.returncode != 0
    assert "tract.helpers" in result.stdout, result.stdout
