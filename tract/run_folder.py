"""The run folder: where a run lives (new, continued, or branched off a checkpoint), checked before anything is
written, and held by one run at a time.

A run holds ``OUTPUT/run.lock`` (an flock) for its lifetime; the operating system releases it when the process ends,
however it ends, so a killed run never leaves a stale lock. A second run, or ``--resume`` of a run that is still
training, is refused with the host and process that hold the folder. A run whose folder is deleted or replaced while
it runs (the folder or its lock is no longer the one it locked) stops at its next checkpoint or log line.

A run folder, its ``checkpoints/`` and the files in them are the run's own: a link to elsewhere is refused before
anything is written (but ``last`` and ``best``, train.py's links to a checkpoint beside them). ``args.yaml`` is
written as soon as the folder is locked, so a run killed at any point of its start-up is continued by ``--resume``.
"""
import argparse
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from tract.config import ConfigError
from tract.safe_files import UnsafeFileError, disk_problem, link_problem, read_yaml, refuse_link

__all__ = ["LOCK_NAME", "ARCHITECTURE_ARGS", "holds_run", "check_output_dir", "RunLock", "RunPlace",
           "place_run", "check_still_held", "RunFolderLost", "on_main"]

LOCK_NAME = "run.lock"
# What a checkpoint's tensors are shaped by: a resume that changes one of these cannot load it.
ARCHITECTURE_ARGS = ("model", "model_kwargs", "in_chans", "input_size")


def holds_run(folder: Path) -> bool:
    """Whether a folder already holds a train.py run (never written over without --resume)."""
    folder = Path(folder)
    return any(os.path.lexists(folder / name) for name in ("args.yaml", "checkpoints", "log.txt"))


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


class RunFolderLost(ConfigError):
    """The run folder was deleted or replaced while this run held it."""


_HELD: Dict[str, "RunLock"] = {}  # real path of a run folder -> the lock this process holds on it


def check_still_held(folder: Path) -> None:
    """Raise RunFolderLost if this process locked ``folder`` and it (or its run.lock) is no longer the one locked."""
    lock = _HELD.get(os.path.realpath(folder))
    if lock is not None:
        lock.check()


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
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
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

    def release(self) -> None:
        """Let go of the lock; a folder this run created and left with nothing trained (the lock and the args.yaml
        it wrote) is removed."""
        if self._fd is None:
            return
        _HELD.pop(os.path.realpath(self.folder), None)
        try:
            self.check()
            left = {p.name for p in self.folder.iterdir()}
        except (ConfigError, OSError):
            left = None
        if self._created_folder and left is not None and left <= {LOCK_NAME, "args.yaml"}:
            try:
                for name in left:
                    (self.folder / name).unlink()
                self.folder.rmdir()
            except OSError:  # something appeared meanwhile: the folder stays, the error being raised is the news
                pass
        os.close(self._fd)
        self._fd = None


def _saved_args(run: Path) -> Dict[str, Any]:
    path = Path(run) / "args.yaml"
    if not os.path.lexists(path):
        return {}
    fix = (f"it is not the args.yaml train.py writes. Restore it, or delete it and rerun the command with --resume "
           f"{run} (the command line then gives the run's options)")
    values = read_yaml(path, fix=fix) or {}
    if not isinstance(values, dict):
        raise UnsafeFileError(f"{path} is not a mapping of options: {fix}")
    return values


def _foreign_links(run: Path) -> List[str]:
    """The links in a run folder and its checkpoints/ that are not train.py's own ``last``/``best``."""
    found = []
    for folder in (run, run / "checkpoints"):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in os.scandir(folder):
            if entry.is_symlink() and not (folder.name == "checkpoints" and entry.name in ("last", "best")):
                found.append(link_problem(Path(entry.path)))
    return found


def _check_own_files(run: Path) -> None:
    """Refuse a run folder, or a checkpoints/ or file in it, that is a link to elsewhere, naming it."""
    from tract.checkpoint import link_target

    refuse_link(run, f"Pass the real folder: {os.path.realpath(run)}")
    refuse_link(run / "checkpoints", f"A run's checkpoints/ must be its own folder: delete the link, then rerun the "
                                     f"command with --resume {run}")
    links = _foreign_links(run)
    if links:
        raise UnsafeFileError(f"{links[0]}, not a file of the run: nothing is written through it. Delete "
                              f"{'it' if len(links) == 1 else f'it and the {len(links) - 1} other link(s)'}, then "
                              f"rerun the command")
    for link in ("last", "best"):
        link_target(run / "checkpoints", link)


def _rewind_plan(run: Path, checkpoint: Path) -> Tuple[List[str], List[int]]:
    """What resuming ``run`` from its own ``checkpoint`` would leave behind: the later checkpoints and the epochs
    logged past it."""
    from tract.checkpoint import checkpoint_names, name_position
    from tract.run_log import read_log

    position = name_position(checkpoint.name)
    later = [n for n in checkpoint_names(run / "checkpoints") if name_position(n) > position]
    logged = [r["epoch"] for r in read_log(run / "log.txt") if r["epoch"] > position[0]]  # numbered from 1
    return later, logged


def _move_aside(run: Path, checkpoint: Path, later: List[str], log: Callable[[str], None]) -> None:
    """--rewind: the later checkpoints and the whole log go to ``run/rewound-<time>/``; ``last`` points at the
    checkpoint resumed from (the log is cut back to it by RunLog)."""
    from tract.checkpoint import relink

    aside = run / f"rewound-{time.strftime('%Y%m%d-%H%M%S')}"
    (aside / "checkpoints").mkdir(parents=True)
    root = run / "checkpoints"
    for name in later:
        os.rename(root / name, aside / "checkpoints" / name)
    if (run / "log.txt").is_file():
        shutil.copy2(run / "log.txt", aside / "log.txt")
    relink(root, "last", checkpoint.name)
    if (root / "best").is_symlink() and os.readlink(root / "best") in later:
        (root / "best").unlink()
    log(f"note: rewound {run} to {checkpoint.name}: its later checkpoints and its log as it was are in {aside}")


def on_main(accelerator, fn: Callable[[], Any]) -> Any:
    """fn() run on the main process only, its result given to every process; a ConfigError there is raised on every
    process, so all stop together."""
    from accelerate.utils import broadcast_object_list

    outcome = [None, None]  # result, error
    if accelerator.is_main_process:
        try:
            outcome[0] = fn()
        except ConfigError as e:
            outcome[1] = e
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


@dataclass
class RunPlace:
    """Where a run lives: its folder, the verified checkpoint it starts from, whether it continues in place."""

    output_dir: Path
    checkpoint: Optional[Path] = None
    continues: bool = False  # --resume of a run folder: its log is cut back to the checkpoint
    lock: Optional[RunLock] = None

    def release(self) -> None:
        """Let go of the folder's lock (at the end of the run, however it ends)."""
        if self.lock is not None:
            self.lock.release()


def place_run(args: argparse.Namespace, accelerator, *, log: Callable[[str], None] = print) -> RunPlace:
    """Decide the run folder from ``--resume`` / ``--output-dir``, refuse what cannot work, and lock it.

    ``--resume RUN`` continues RUN in place (even when its args.yaml remembers another output_dir: a moved run), from
    its newest intact checkpoint, or from the start when it has none yet; ``--resume CHECKPOINT --output-dir NEW``
    branches a new run off a checkpoint. Changing what the checkpoint's tensors are shaped by is refused. Nothing is
    written for ``--eval`` and ``--dry-run``; otherwise the folder is locked for the run's lifetime. ``args`` is
    updated: ``output_dir`` always; ``resume`` / ``finetune`` for a run that starts again from the beginning.
    """
    from tract.checkpoint import resolve_resume

    # Verifying reads (and hashes) every file of a checkpoint: once, not once per process of a launch.
    checkpoint, source = on_main(accelerator, lambda: resolve_resume(args.resume, log=log)) if args.resume else (
        None, None)
    saved = _saved_args(source) if source else {}
    continues = source is not None
    if source and args.output_dir and Path(args.output_dir).resolve() != source:
        if Path(args.resume).resolve() == checkpoint and args.output_dir != saved.get("output_dir"):
            continues = False
        else:
            log(f"note: continuing the run in {source} (the folder given to --resume), not {args.output_dir}")
    if continues:
        output_dir = source
    else:
        output_dir = Path(args.output_dir) if args.output_dir else _default_output_dir(args, accelerator)
    writes = not (args.eval or args.dry_run)
    if writes:
        check_output_dir(output_dir)
        if os.path.lexists(output_dir):
            _check_own_files(Path(output_dir))
        if holds_run(output_dir) and not continues:
            raise ConfigError(f"{output_dir} already holds a run: pass --resume {output_dir} to continue it, or "
                              "choose another --output-dir")
    rewind = None  # the later checkpoints to move aside, when the run is rewound
    if writes and continues and checkpoint is not None and Path(args.resume).resolve() == checkpoint:
        later, logged = _rewind_plan(output_dir, checkpoint)
        if (later or logged) and not getattr(args, "rewind", False):
            beyond = ", ".join(later[:3]) + (" ..." if len(later) > 3 else "")
            raise ConfigError(f"--resume {args.resume} would rewind the run in {output_dir} to {checkpoint.name}: "
                              f"its later checkpoints ({beyond or 'none'}) and logged epochs "
                              f"({', '.join(map(str, logged)) or 'none'}) would be mixed with the new ones. Add "
                              f"--rewind to move them aside into {output_dir}/rewound-<time>/ and continue from "
                              f"{checkpoint.name}, or branch a new run with --output-dir NEW_FOLDER")
        rewind = later if later or logged else None
    now = vars(args)
    changed = {k: (v, now[k]) for k, v in saved.items() if k in now and now[k] != v and k != "output_dir"}
    fixed = {k: then for k, (then, _) in changed.items() if k in ARCHITECTURE_ARGS}
    if fixed:
        raise ConfigError(f"--resume {args.resume}: the run was started with " +
                          ", ".join(f"{k}={v!r}" for k, v in fixed.items()) + " and its checkpoints only fit that; "
                          f"leave them out (--resume {args.resume} alone takes the run's)")
    if args.resume and checkpoint is None:
        if args.eval:
            raise ConfigError(f"--eval --resume {args.resume}: the run has no checkpoint yet, nothing to evaluate")
        log(f"note: {source} has no checkpoint yet: the run starts from the beginning")
        args.resume = None  # a fresh start: the --finetune weights are loaded again, the run's own if none is given
        args.finetune = args.finetune or saved.get("finetune")
    args.output_dir = str(output_dir)
    place = RunPlace(Path(output_dir), checkpoint, continues)
    if writes:
        place.lock = RunLock(output_dir)
        on_main(accelerator, place.lock.acquire)
        try:
            on_main(accelerator, lambda: _start_writing(args, place, rewind, log))
        except BaseException:
            place.release()
            raise
    return place


def _start_writing(args: argparse.Namespace, place: RunPlace, rewind: Optional[List[str]],
                   log: Callable[[str], None]) -> None:
    """Right after locking: move a rewound timeline aside, and write args.yaml (atomically) if the run has none, so
    that a kill at any later point of the start-up leaves a folder that --resume continues."""
    from tract.config import save_args

    if rewind is not None:
        _move_aside(place.output_dir, place.checkpoint, rewind, log)
    path = place.output_dir / "args.yaml"
    if not os.path.lexists(path):
        try:
            save_args(args, path)
        except OSError as e:
            again = f" with --resume {place.output_dir}" if place.continues else ""
            raise ConfigError(f"cannot write {path}: {disk_problem(path, e)}. Free space (or fix the permissions), "
                              f"then rerun the command{again}") from None


def _default_output_dir(args: argparse.Namespace, accelerator) -> Path:
    """timm's naming: output/train/<YYYYmmdd-HHMMSS>-<model>-<size>, the same on every process."""
    from accelerate.utils import broadcast_object_list

    from tract.models import resolve_model_name

    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(stamp)
    return Path("output") / "train" / f"{stamp[0]}-{resolve_model_name(args.model)[0]}-{args.input_size}"
