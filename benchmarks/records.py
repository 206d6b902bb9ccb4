"""The benchmarks' records: results CSVs whose every row says where it came from, and report blocks in Markdown files
that a --report-only run rewrites from those CSVs (so a reader can re-derive every quoted number)."""
import argparse
import csv
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import List, Sequence

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = ("commit", "utc", "command", "machine", "torch", "timm")  # on every row of every benchmark's CSV


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def machine() -> str:
    """This machine in words: CPU model, cores, and the GPUs nvidia-smi lists (read without importing torch)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or platform.machine())
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True) if shutil.which("nvidia-smi") else None
    gpus = smi.stdout.strip().splitlines() if smi and smi.returncode == 0 else []
    return f"{cpu}, {os.cpu_count()} cores" + (f", {len(gpus)} x {gpus[0]}" if gpus else ", no GPU")


def provenance(cmd: Sequence[str]) -> dict:
    """Where a result came from: the code's commit (+dirty when tracked files differ from it), the UTC time, the exact
    train.py command (paths relative to the repository), the machine and the torch/timm versions."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    command = shlex.join("python" if c == sys.executable else c.replace(f"{ROOT}/", "") for c in cmd)
    return {"commit": commit, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
            "machine": machine(), "torch": version("torch"), "timm": version("timm")}


def read_csv(path: Path, floats: Sequence[str] = (), ints: Sequence[str] = ()) -> List[dict]:
    """The rows of a benchmark's results CSV (none when it does not exist yet), the named columns as numbers."""
    if not path.exists():
        return []
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.update({k: float(r[k]) for k in floats})
        r.update({k: int(r[k]) for k in ints})
    return rows


def append_csv(path: Path, row: dict, fields: Sequence[str], cmd: Sequence[str]) -> None:
    """Append one finished run, with its provenance, to a results CSV as soon as it ends (the header first when the
    file is new); a file with other columns is refused rather than mixed."""
    fields = [*fields, *PROVENANCE]
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{path} has the columns {header}, not {fields}: write to a new file (--out-dir)")
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow({**row, **provenance(cmd)})


def update_block(path: Path, name: str, text: str) -> bool:
    """Replace the text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` in ``path``; False when it has none."""
    if not path.exists():
        return False
    old = path.read_text()
    pattern = re.compile(rf"(<!-- begin {re.escape(name)} -->\n)(?:.*?\n)?(<!-- end {re.escape(name)} -->)", re.S)
    if not pattern.search(old):
        return False
    path.write_text(pattern.sub(lambda m: m.group(1) + text.strip("\n") + "\n" + m.group(2), old))
    return True


def block(path: Path, name: str) -> str:
    """The text of a report block (what update_block wrote)."""
    found = re.search(rf"<!-- begin {re.escape(name)} -->\n(?:(.*?)\n)?<!-- end {re.escape(name)} -->",
                      path.read_text(), re.S)
    return (found.group(1) or "") if found else ""


def positive_int(text: str) -> int:
    """argparse type of a count such as --jobs: a whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
