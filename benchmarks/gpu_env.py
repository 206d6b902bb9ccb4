"""The environment step of benchmarks/gpu_check.sh: every version floor of requirements.txt against what is installed.

    python benchmarks/gpu_env.py                 # python, torch, CUDA, each floor, the GPUs; status 1 if one fails
    python benchmarks/gpu_env.py --wheels DIR    # the wheels in DIR that lift a package below its floor, one a line

Versions are read from the installed distributions (importlib.metadata, in sys.path order: a folder on PYTHONPATH
wins over site-packages), so the packages are not imported; torch is, for CUDA and the GPUs.
"""
import argparse
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Optional

from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def floors(text: str) -> Dict[str, str]:
    """{package: minimum version} of the 'name>=version' requirements in ``text`` (requirements.txt, pyproject)."""
    return {m[1]: m[2] for m in re.finditer(r'(?m)^\s*"?([A-Za-z0-9_.-]+)>=([0-9.]+)', text)}


def installed(name: str) -> Optional[str]:
    """The version of distribution ``name`` that Python would import first, None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def below(required: Dict[str, str]) -> List[str]:
    """The packages of ``required`` that are missing or older than their floor."""
    return [name for name, floor in required.items()
            if installed(name) is None or Version(installed(name)) < Version(floor)]


def lifting_wheels(folder: Path, required: Dict[str, str]) -> List[Path]:
    """The wheels in ``folder`` that bring a package of ``below(required)`` to its floor."""
    wanted = {canonicalize_name(name): Version(required[name]) for name in below(required)}
    wheels = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name in wanted and version >= wanted[name]:
            wheels.append(wheel)
    return wheels


def report(required: Dict[str, str]) -> bool:
    """Print the interpreter, each floor against what is installed and where, and the GPUs; True if all is well."""
    import platform

    import torch  # here, not at the top: --wheels runs before a carried wheel is installed and needs none of these

    sys.path.insert(0, str(REPO))
    from tract.errors import ConfigError
    from tract.runtime import check_cuda

    print(f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__} "
          f"(CUDA {torch.version.cuda})\n")
    print("| package | floor | installed | from | ok |\n|---|---|---|---|---|")
    old = set(below(required))
    for name, floor in required.items():
        version = installed(name)
        where = metadata.distribution(name).locate_file("") if version else "-"
        print(f"| {name} | {floor} | {version or 'missing'} | {where} | {'no' if name in old else 'yes'} |")
    well = not old
    if old:
        print(f"\nbelow their floor: {' '.join(sorted(old))} (gpu_check.sh --prepare carries a newer timm)")
    print()
    if not torch.cuda.is_available():
        print("no CUDA GPU: the toy-size plan (--cpu)")
        return well
    for i in range(torch.cuda.device_count()):
        print(f"GPU {i}: {torch.cuda.get_device_name(i)}, capability {torch.cuda.get_device_capability(i)}")
    print("kernels for:", " ".join(torch.cuda.get_arch_list()))
    try:
        check_cuda()
    except ConfigError as e:
        print(f"tract.runtime.check_cuda: {e}")
        return False
    print("tract.runtime.check_cuda: this torch runs on these GPUs")
    return well


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--wheels", type=Path, default=None, metavar="DIR",
                   help="print the wheels in DIR that lift a package below its floor, and nothing else")
    opts = p.parse_args()
    required = floors((REPO / "requirements.txt").read_text())
    if opts.wheels is not None:
        for wheel in lifting_wheels(opts.wheels, required):
            print(wheel)
        return
    sys.exit(0 if report(required) else 1)


if __name__ == "__main__":
    main()
