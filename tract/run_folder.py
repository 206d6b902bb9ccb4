"""The run folder: where a run lives (new, continued, or branched off a checkpoint), checked before anything is
written, and held by one run at a time.

A run holds ``OUTPUT/run.lock`` (an flock) for its lifetime; the operating system releases it when the process ends,
however it ends, so a killed run never leaves a stale lock. A second run, or ``--resume`` of a run that is still
training, is refused with the host and process that hold the folder.
"""
import argparse
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from tract.config import ConfigError

__all__ = ["LOCK_NAME", "ARCHITECTURE_ARGS", "holds_run", "check_output_dir", "RunLock", "RunPlace",
           "place_run"]

LOCK_NAME = "run.lock"
# What a checkpoint's tensors are shaped by: a resume that changes one of these cannot load it.
ARCHITECTURE_ARGS = ("model", "model_kwargs", "in_chans", "input_size")


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


def _saved_args(run: Path) -> Dict[str, Any]:
    import yaml

    path = Path(run) / "args.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _on_main(accelerator, fn: Callable[[], Any]) -> Any:
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
    checkpoint, source = _on_main(accelerator, lambda: resolve_resume(args.resume, log=log)) if args.resume else (
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
        if holds_run(output_dir) and not continues:
            raise ConfigError(f"{output_dir} already holds a run: pass --resume {output_dir} to continue it, or "
                              "choose another --output-dir")
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
        _on_main(accelerator, place.lock.acquire)
    return place


def _default_output_dir(args: argparse.Namespace, accelerator) -> Path:
    """timm's naming: output/train/<YYYYmmdd-HHMMSS>-<model>-<size>, the same on every process."""
    from accelerate.utils import broadcast_object_list

    from tract.models import resolve_model_name

    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(stamp)
    return Path("output") / "train" / f"{stamp[0]}-{resolve_model_name(args.model)[0]}-{args.input_size}"
