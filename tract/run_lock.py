"""The run's lock: ``OUTPUT/run.lock``, held by one run at a time, and the check that a run still holds its folder.

A run holds ``OUTPUT/run.lock`` (an flock) for its lifetime; the operating system releases it when the process ends,
however it ends, so a killed run never leaves a stale lock. A second run, or ``--resume`` of a run that is still
training, is refused with the host and process that hold the folder. A run whose folder is deleted or replaced while
it runs (the folder or its lock is no longer the one it locked) stops at its next checkpoint or log line: every
module that writes into a run folder (checkpoint, run_log, run_folder) asks ``check_still_held`` first, so the lock
lives beneath all of them.
"""
import errno
import fcntl
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tract.errors import ConfigError
from tract.safe_files import UnsafeFileError, refuse_link

__all__ = ["LOCK_NAME", "RunLock", "RunFolderLost", "check_still_held"]

LOCK_NAME = "run.lock"


class RunFolderLost(ConfigError):
    """The run folder was deleted or replaced while this run held it."""


_HELD: Dict[str, "RunLock"] = {}  # real path of a run folder -> the lock this process holds on it


def check_still_held(folder: Path) -> None:
    """Raise RunFolderLost if this process locked ``folder`` and it (or its run.lock) is no longer the one locked."""
    lock = _HELD.get(os.path.realpath(folder))
    if lock is not None:
        lock.check()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _flock_holders(info: os.stat_result) -> List[int]:
    """The processes the kernel lists as holding an flock on the file ``info`` describes (Linux's /proc/locks)."""
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks") as f:
            lines = [line.split() for line in f]
    except OSError:
        return []
    return sorted({int(fields[4]) for fields in lines if len(fields) > 5 and fields[1] == "FLOCK" and
                   fields[5] == device and fields[4].isdigit()})


def _holder(written: bytes, info: os.stat_result) -> str:
    """Who holds a run's lock: the process the lock file names, if it still runs; else the holder the kernel lists,
    for a process that opened the lock without writing it (another user, once able to read it) may hold it."""
    try:
        who = json.loads(written.decode(errors="replace"))
        pid, host, started = int(who["pid"]), str(who["host"]), str(who["started"])
    except (ValueError, KeyError, TypeError):
        who = None
    if who is not None and (host != socket.gethostname() or _alive(pid)):
        return f"process {pid} on {host} (since {started})"
    holders = _flock_holders(info)
    named = (f"process {', '.join(map(str, holders))} on {socket.gethostname()}" if holders else
             "another process")
    return named + (f", not the run that wrote {LOCK_NAME} (its process {pid} has ended)" if who is not None else "")


class RunLock:
    """An exclusive lock on a run folder for the lifetime of the run (or until :meth:`release`)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None
        self._created_folder = False
        self._identity: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None  # (device, inode) of folder, lock

    def acquire(self) -> "RunLock":
        """Take the lock (creating the folder), or raise ConfigError naming the host and process holding it."""
        self._created_folder = not os.path.lexists(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        refuse_link(self.folder, f"Pass the real folder: --output-dir {os.path.realpath(self.folder)}")
        try:  # readable by its owner only: anyone who can open a lock can flock it, and so hold the run's folder
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                refuse_link(self.path, f"Delete it, then rerun the command (with --resume {self.folder} if the "
                                       "folder holds a run)")
            raise ConfigError(f"cannot create {self.path}: {e.strerror}: choose another --output-dir") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise UnsafeFileError(f"{self.path} is not a plain file of the run (a hard link to a file elsewhere, or "
                                  f"not a file): nothing is written through it. Delete it, then rerun the command")
        if info.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)  # a lock an earlier version made readable by all
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.read(fd, 4096), info)
            os.close(fd)
            raise ConfigError(f"{self.folder} is in use by {holder}: a run is writing there. Wait for it to end or "
                              "stop it, or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self._fd = fd
        folder = os.lstat(self.folder)
        self._identity = ((folder.st_dev, folder.st_ino), (info.st_dev, info.st_ino))
        _HELD[os.path.realpath(self.folder)] = self
        return self

    def check(self) -> None:
        """Raise RunFolderLost if the folder or its run.lock is no longer the one this lock was taken on."""
        if self._fd is None:
            return
        try:
            folder, lock = os.lstat(self.folder), os.lstat(self.path)
            now = ((folder.st_dev, folder.st_ino), (lock.st_dev, lock.st_ino))
        except OSError:
            now = None
        if now != self._identity:
            raise RunFolderLost(f"{self.folder} was deleted or replaced while this run was writing there ({LOCK_NAME} "
                                "is gone or another's): this run stops and writes nothing more there. A run now in "
                                "that folder is not affected; if the folder was deleted by mistake, start the run "
                                "again with the original command")

    def release(self, keep: bool = False) -> None:
        """Let go of the lock; a folder this run created and left with nothing trained (the lock and the args.yaml
        it wrote) is removed, unless ``keep`` (a start-up stopped by a signal: the requeued job resumes it)."""
        if self._fd is None:
            return
        _HELD.pop(os.path.realpath(self.folder), None)
        try:
            self.check()
            left = {p.name for p in self.folder.iterdir()}
        except (ConfigError, OSError):
            left = None
        if self._created_folder and not keep and left is not None and left <= {LOCK_NAME, "args.yaml"}:
            try:
                for name in left:
                    (self.folder / name).unlink()
                self.folder.rmdir()
            except OSError:  # something appeared meanwhile: the folder stays, the error being raised is the news
                pass
        os.close(self._fd)
        self._fd = None
