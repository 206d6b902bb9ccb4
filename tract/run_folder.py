"""The run folder: checked before anything is written, and held by one run at a time.

A run holds ``OUTPUT/run.lock`` (an flock) for its lifetime; the operating system releases it when the process ends,
however it ends, so a killed run never leaves a stale lock. A second run, or ``--resume`` of a run that is still
training, is refused with the host and process that hold the folder.
"""
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from tract.config import ConfigError

__all__ = ["LOCK_NAME", "holds_run", "check_output_dir", "RunLock"]

LOCK_NAME = "run.lock"


def holds_run(folder: Path) -> bool:
    """Whether a folder already holds a train.py run (never written over without --resume)."""
    folder = Path(folder)
    return any((folder / name).exists() for name in ("args.yaml", "checkpoints", "log.txt"))


def check_output_dir(folder: Path) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be written, before any write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output-dir {folder} is a file, not a folder: choose another --output-dir")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--output-dir {folder} lies under {probe}, which is a file: choose another --output-dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {folder}: {probe} is not writable: choose another --output-dir")


class RunLock:
    """An exclusive lock on a run folder for the lifetime of the run (or until :meth:`release`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None
        self._created_folder = False

    def acquire(self) -> "RunLock":
        """Take the lock (creating the folder), or raise ConfigError naming the host and process holding it."""
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace")
            os.close(fd)
            try:
                who = json.loads(holder)
                holder = f"process {who['pid']} on {who['host']} (since {who['started']})"
            except (ValueError, KeyError, TypeError):
                holder = "another process"
            raise ConfigError(f"{self.folder} is in use by {holder}: a run is writing there. Wait for it to end or "
                              "stop it, or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Let go of the lock; a folder this run created and left empty but for the lock is removed."""
        if self._fd is None:
            return
        if self._created_folder and {p.name for p in self.folder.iterdir()} == {LOCK_NAME}:
            self.path.unlink()
            self.folder.rmdir()
        os.close(self._fd)
        self._fd = None
