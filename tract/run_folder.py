"""The run folder: where a run lives (new, continued, or branched off a checkpoint), checked before anything is
written, and held by one run at a time (its lock: tract/run_lock.py).

A run folder, its ``checkpoints/`` and the files in them are the run's own: a link to elsewhere is refused before
anything is written (but ``last`` and ``best``, train.py's links to a checkpoint beside them). ``args.yaml`` is
written as soon as the folder is locked, so a run killed at any point of its start-up is continued by ``--resume``.
"""
import argparse
import itertools
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from tract.checkpoint import (RUN_ARGS, checkpoint_args, checkpoint_names, link_target, name_position,
                              older_checkpoints, relink, resolve_resume)
from tract.config import RESUME_FREE, RUN_CONTROL, save_args
from tract.errors import ConfigError
from tract.models import resolve_model_name
from tract.run_lock import LOCK_NAME, RunLock
from tract.run_log import MAX_LOG_BYTES, read_log
from tract.runtime import on_main
from tract.safe_files import (MAX_YAML_BYTES, UnsafeFileError, append_text, disk_problem, link_problem, parse_yaml,
                              read_bytes, refuse_link, write_new)

__all__ = ["ARCHITECTURE_ARGS", "holds_run", "check_output_dir", "RunPlace", "place_run"]

# What a checkpoint's tensors are shaped by: a resume that changes one of these cannot load it.
ARCHITECTURE_ARGS = ("model", "model_kwargs", "in_chans", "input_size")


def holds_run(folder: Path) -> bool:
    """Whether a folder already holds a train.py run (never written over without --resume)."""
    folder = Path(folder)
    return any(os.path.lexists(folder / name) for name in ("args.yaml", "checkpoints", "log.txt"))


# Room below a run folder for the longest path a run writes there, and some: a mid-epoch checkpoint's EMA written in
# its private folders (/checkpoints/.tmp-epoch-0000-update-000000-XXXXXXXX/.ema.safetensors.XXXXXXXX/ema.safetensors,
# 93 bytes), TensorBoard's /events.out.tfevents.<time>.<host>.<pid>.<n> (43 bytes and the host name).
DEEPEST_WRITE = 128


def check_output_dir(folder: Path) -> None:
    """Refuse an output folder that is a file, lies under a file, cannot be written, or has a name TensorBoard cannot
    write under (not UTF-8, or too long for the files a run writes below it), before any write."""
    folder = Path(folder)
    try:
        os.fsencode(folder).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--output-dir {os.fsencode(folder)!r} is not UTF-8, which TensorBoard's event files need: "
                          "choose another --output-dir") from None
    longest = len(os.fsencode(os.path.abspath(folder))) + DEEPEST_WRITE + len(socket.gethostname())
    path_max, name_max = os.pathconf("/", "PC_PATH_MAX"), os.pathconf("/", "PC_NAME_MAX")
    if longest >= path_max or any(len(os.fsencode(part)) > name_max for part in folder.parts):
        raise ConfigError(f"--output-dir {str(folder)[:80]}... is too long: the files a run writes below it would "
                          f"have {longest} bytes, beyond the {path_max - 1} a path may have (or a name more than "
                          f"{name_max}): choose a shorter --output-dir")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--output-dir {folder} is a file, not a folder: choose another --output-dir")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--output-dir {folder} lies under {probe}, which is a file: choose another --output-dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output-dir {folder}: {probe} is not writable: choose another --output-dir")


def _saved_args(run: Path) -> Tuple[Optional[bytes], Dict[str, Any]]:
    """A run's args.yaml: its bytes (read once) and its options (None, {} when it has none)."""
    path = Path(run) / "args.yaml"
    if not os.path.lexists(path):
        return None, {}
    fix = (f"it is not the args.yaml train.py writes. Restore it, or delete it and rerun the command with --resume "
           f"{run} (the command line then gives the run's options)")
    try:
        data = read_bytes(path, MAX_YAML_BYTES)
        values = parse_yaml(data, path) or {}
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{e}: {fix}") from None
    if not isinstance(values, dict):
        raise UnsafeFileError(f"{path} is not a mapping of options: {fix}")
    return data, values


def _edits(args: argparse.Namespace, checkpoint: Path) -> Dict[str, Tuple[Any, Any]]:
    """The options this run computes with that differ from those its run started with (the args.yaml copy in
    ``checkpoint``; nothing for a checkpoint that has none), as {name: (then, now)}: an edit of args.yaml, or a
    change on the command line (which check_resume_changes lets through only with --resume-override)."""
    data = checkpoint_args(checkpoint)
    if data is None:
        return {}
    then = parse_yaml(data, checkpoint / RUN_ARGS)
    if not isinstance(then, dict):
        raise UnsafeFileError(f"{checkpoint / RUN_ARGS} is not a mapping of options")
    now = vars(args)
    return {k: (v, now[k]) for k, v in then.items()
            if k in now and now[k] != v and k not in RESUME_FREE and k not in RUN_CONTROL and k != "output_dir"}


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
    position = name_position(checkpoint.name)
    later = [n for n in checkpoint_names(run / "checkpoints") if name_position(n) > position]
    logged = [r["epoch"] for r in read_log(run / "log.txt") if r.get("epoch", 0) > position[0]]  # numbered from 1
    return later, logged


def _new_folder(parent: Path, name: str) -> Path:
    """``parent/name`` made now, or ``name-2``, ``name-3``, ... when that name is taken (by a folder or a link planted
    there, or by a rewind in the same second): never one that was there before."""
    for number in itertools.count(1):
        folder = parent / (name if number == 1 else f"{name}-{number}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def _move_aside(run: Path, checkpoint: Path, later: List[str], log: Callable[[str], None]) -> None:
    """--rewind: the later checkpoints and the whole log go to ``run/rewound-<time>/``; ``last`` points at the
    checkpoint resumed from (the log is cut back to it by RunLog)."""
    aside = _new_folder(run, f"rewound-{time.strftime('%Y%m%d-%H%M%S')}")
    (aside / "checkpoints").mkdir()
    root = run / "checkpoints"
    for name in later:
        os.rename(root / name, aside / "checkpoints" / name)
    if os.path.lexists(run / "log.txt"):  # copied as bytes into a fresh file: never through a link
        write_new(aside / "log.txt", read_bytes(run / "log.txt", MAX_LOG_BYTES))
    relink(root, "last", checkpoint.name)
    if (root / "best").is_symlink() and os.readlink(root / "best") in later:
        (root / "best").unlink()
    log(f"note: rewound {run} to {checkpoint.name}: its later checkpoints and its log as it was are in {aside}")


@dataclass
class RunPlace:
    """Where a run lives: its folder, the verified checkpoint it starts from, whether it continues in place."""

    output_dir: Path
    checkpoint: Optional[Path] = None
    continues: bool = False  # --resume of a run folder: its log is cut back to the checkpoint
    lock: Optional[RunLock] = None
    fallbacks: List[Path] = field(default_factory=list)  # older checkpoints, newest first, if ``checkpoint`` fails
    args_yaml: Optional[bytes] = None  # the run's args.yaml as this run started: each checkpoint keeps a copy
    overrides: str = ""  # what --resume-override let change against the args.yaml the run started with

    def release(self, keep: bool = False) -> None:
        """Let go of the folder's lock (at the end of the run, however it ends); ``keep``: see RunLock.release."""
        if self.lock is not None:
            self.lock.release(keep)


def place_run(args: argparse.Namespace, accelerator, *, log: Callable[[str], None] = print) -> RunPlace:
    """Decide the run folder from ``--resume`` / ``--output-dir``, refuse what cannot work, and lock it.

    ``--resume RUN`` continues RUN in place (even when its args.yaml remembers another output_dir: a moved run), from
    its newest intact checkpoint, or from the start when it has none yet; ``--resume CHECKPOINT --output-dir NEW``
    branches a new run off a checkpoint. Changing what the checkpoint's tensors are shaped by is refused. Nothing is
    written for ``--eval`` and ``--dry-run``; otherwise the folder is locked for the run's lifetime. ``args`` is
    updated: ``output_dir`` always; ``resume`` / ``finetune`` for a run that starts again from the beginning.
    """
    # Verifying reads (and hashes) every file of a checkpoint: once, not once per process of a launch.
    checkpoint, source = on_main(accelerator, lambda: resolve_resume(args.resume, log=log)) if args.resume else (
        None, None)
    run_args, saved = _saved_args(source) if source else (None, {})
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
        if continues:
            read_log(Path(output_dir) / "log.txt")  # a doctored line is refused before anything is built
        if holds_run(output_dir) and not continues:
            raise ConfigError(f"{output_dir} already holds a run: pass --resume {output_dir} to continue it, or "
                              "choose another --output-dir")
        foreign = [] if continues or not os.path.isdir(output_dir) else sorted(
            set(os.listdir(output_dir)) - {LOCK_NAME, ".args.yaml.tmp"})  # a start-up's, killed before args.yaml
        if foreign:
            raise ConfigError(f"--output-dir {output_dir} holds files that are not a train.py run's "
                              f"({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}): nothing is written "
                              "there. Choose another --output-dir (a new or an empty folder)")
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
    edits = _edits(args, checkpoint) if checkpoint is not None else {}
    told = "; ".join(f"{k} {then!r} -> {now!r}" for k, (then, now) in edits.items())
    if edits and not args.resume_override:
        raise ConfigError(f"--resume {args.resume}: {source / 'args.yaml'} was edited since the run started: {told} "
                          f"({checkpoint.name} holds the args.yaml the run started with). Restore it (cp "
                          f"{checkpoint / RUN_ARGS} {source / 'args.yaml'}), or add --resume-override to take the "
                          "change (it is recorded in log.txt)")
    if args.resume and checkpoint is None:
        if args.eval:
            raise ConfigError(f"--eval --resume {args.resume}: the run has no checkpoint yet, nothing to evaluate")
        log(f"note: {source} has no checkpoint yet: the run starts from the beginning")
        args.resume = None  # a fresh start: the --finetune weights are loaded again, the run's own if none is given
        args.finetune = args.finetune or saved.get("finetune")
    args.output_dir = str(output_dir)
    place = RunPlace(Path(output_dir), checkpoint, continues, args_yaml=run_args if continues else None,
                     overrides=told)
    if checkpoint is not None and Path(args.resume).resolve() != checkpoint:  # a run folder: fall back if need be
        place.fallbacks = older_checkpoints(checkpoint)
    if writes:
        place.lock = RunLock(output_dir)
        on_main(accelerator, place.lock.acquire)
        try:
            place.args_yaml = on_main(accelerator, lambda: _start_writing(args, place, rewind, log))
        except BaseException:
            place.release()
            raise
    return place


def _start_writing(args: argparse.Namespace, place: RunPlace, rewind: Optional[List[str]],
                   log: Callable[[str], None]) -> Optional[bytes]:
    """Right after locking: move a rewound timeline aside, write args.yaml (atomically) if the run has none, so that a
    kill at any later point of the start-up leaves a folder that --resume continues, and record in log.txt what
    --resume-override let change. Returns the run's args.yaml as this run starts."""
    if rewind is not None:
        _move_aside(place.output_dir, place.checkpoint, rewind, log)
    path = place.output_dir / "args.yaml"
    try:
        if place.overrides:
            line = {"resume_override": place.overrides, "after_epoch": name_position(place.checkpoint.name)[0],
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            append_text(place.output_dir / "log.txt", json.dumps(line) + "\n")
        if not os.path.lexists(path):
            return save_args(args, path)
    except OSError as e:
        failed = path if not place.overrides or os.path.lexists(path) else place.output_dir / "log.txt"
        again = f" with --resume {place.output_dir}" if place.continues else ""
        raise ConfigError(f"cannot write {failed}: {disk_problem(failed, e)}. Free space (or fix the permissions), "
                          f"then rerun the command{again}") from None
    return place.args_yaml


def _default_output_dir(args: argparse.Namespace, accelerator) -> Path:
    """timm's naming: OUTPUT/train/EXPERIMENT (``--output``, default output; ``--experiment``, default
    <YYYYmmdd-HHMMSS>-<model>-<size>, the same on every process); a run from --finetune weights in OUTPUT/finetune/."""
    from accelerate.utils import broadcast_object_list

    stamp = [time.strftime("%Y%m%d-%H%M%S")]
    broadcast_object_list(stamp)
    name = args.experiment or f"{stamp[0]}-{resolve_model_name(args.model)[0]}-{args.input_size}"
    return Path(args.output or "output") / ("finetune" if args.finetune else "train") / name
