"""Checkpoints: written crash-safe with a manifest, verified before use, read without unpickling code.

Layout of a run folder::

    OUTPUT/checkpoints/epoch-0003/                  after 3 full epochs
    OUTPUT/checkpoints/epoch-0003-plus-000120-updates/   3 epochs and 120 updates of the 4th (preemption, or an
                                                         update interval)
    OUTPUT/checkpoints/last -> epoch-0003-plus-000120-updates   (symlinks, replaced atomically)
    OUTPUT/checkpoints/best -> epoch-0003

A checkpoint folder holds Accelerate's ``save_state`` files for what Accelerate does well (``model.safetensors``,
``optimizer.bin``, ``scaler.pt`` under fp16, ``random_states_<process>.pkl``), plus ``train_state.json`` (where
training stands) and ``ema.safetensors``, and last of all ``manifest.json``: every file's size and SHA-256. It is
written to ``.tmp-<name>`` and renamed only when complete, so a folder without a manifest that matches its files is
never trusted.

Loading never runs code, whatever a file holds or is named: only the files the manifest names are read, safetensors
and JSON as such and the rest with ``torch.load(weights_only=True)`` (numpy's RNG arrays are the only extra types
allowed). Accelerate's own ``load_state`` is not used because it unpickles registered objects with
``weights_only=False``. Verification is bounded (tract/safe_files.py): the manifest and train state are read as
small JSON of finite numbers, every listed file must be a regular file (not a link) of the listed size, and the train
state must be one a run writes at the position the folder's name says.

``--resume RUN`` follows ``last``: a checkpoint newer than it (written just before a kill) is not resumed from.
"""
import hashlib
import io
import json
import math
import os
import re
import shutil
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from tract.errors import ConfigError, WeightsError
from tract.models import plain_state_dict
from tract.run_lock import LOCK_NAME, check_still_held
from tract.runtime import on_main
from tract.safe_files import (UnsafeFileError, current_umask, disk_problem, parse_json, private_folder,
                              read_exact, read_json, refuse_link, remove_entry, sha256_file, write_failed, write_new,
                              write_private)
from tract.weights import parse_safetensors

__all__ = ["CheckpointError", "TrainState", "checkpoint_name", "checkpoint_names", "name_position", "link_target",
           "relink", "save_checkpoint", "verify_checkpoint", "resolve_resume", "older_checkpoints", "load_checkpoint",
           "repair_links",
           "settle_resume", "checkpoint_args", "checkpoint_weights", "export_weights", "export_timm_config", "parameters_finite", "MANIFEST",
           "RUN_ARGS"]

MANIFEST = "manifest.json"
# A checkpoint's copy of its run's args.yaml as the run started: what an edit of args.yaml is found against. (Not
# "args.yaml": that name marks a run folder.)
RUN_ARGS = "run_args.yaml"
_FORMAT = 1
# A name says how much training is done: `epoch-0003` 3 epochs, `epoch-0003-plus-000120-updates` 120 updates more.
# Checkpoints of earlier versions named the second `epoch-0003-update-000120` (read as update 120 of epoch 3, where it
# is of epoch 4): still read, for resuming, never written.
_NAME = re.compile(r"^epoch-(\d{4,9})(?:-plus-(\d{6,9})-updates|-update-(\d{6,9}))?$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # what save_state and train.py name their files
MAX_FILES = 1024  # in one checkpoint: a few per process
MAX_FILE_BYTES = 1 << 40  # one checkpoint file (a ViT-g optimizer state is tens of GB)
_COUNT = 1 << 53  # counts (epochs, updates, images) beyond this are not ones a run reached
# timm's pretrained_cfg keys that describe its own hub weights of an architecture, not a model trained here
WEIGHTS_METADATA = ("tag", "license", "description", "origin_url", "paper_ids", "paper_name", "notes")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or used: the message names the folder or file and what to do."""


def _is_count(value: Any, low: int = 0) -> bool:
    return type(value) is int and low <= value < _COUNT


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


@dataclass
class TrainState:
    """Where training stands: ``epoch`` full epochs done plus ``update_in_epoch`` updates into the next one.

    ``pending`` holds the training stats of epoch ``epoch - 1`` until its evaluation is logged, so a run killed
    between its epoch checkpoint and its log line evaluates and logs that epoch when resumed. ``partial`` holds the
    statistics of the epoch in progress at a mid-epoch checkpoint (per process: loss sum, micro-batches, images; and
    the seconds trained), so a resumed epoch's log line is the uninterrupted one's.
    """

    epoch: int = 0
    update_in_epoch: int = 0
    num_updates: int = 0
    best_acc1: float = -1.0
    best_epoch: int = -1
    pending: Dict[str, float] = field(default_factory=dict)
    partial: Dict[str, Any] = field(default_factory=dict)
    # Not saved: set by train_one_epoch while an epoch runs, () -> (loss sum tensor, micro-batches, images, seconds).
    live = None

    def state_dict(self) -> Dict[str, Any]:
        """Plain values (JSON)."""
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; unknown keys and values train.py cannot have written are refused."""
        if not isinstance(state, dict):
            raise ValueError("not a mapping")
        known = {f.name for f in fields(self)}
        unknown = set(state) - known
        if unknown:
            raise ValueError(f"unknown train-state keys {sorted(unknown)[:5]}")
        loaded = TrainState(**{f.name: getattr(TrainState(), f.name) for f in fields(self)})
        for key, value in state.items():
            setattr(loaded, key, value)
        loaded.check()
        for key in known:
            setattr(self, key, getattr(loaded, key))

    def check(self) -> None:
        """Raise ValueError naming the first value that no run can have written (a forged or damaged train state)."""
        for key in ("epoch", "update_in_epoch", "num_updates"):
            if not _is_count(getattr(self, key)):
                raise ValueError(f"{key} {getattr(self, key)!r} is not a count")
        if self.num_updates < self.epoch + self.update_in_epoch:
            raise ValueError(f"num_updates {self.num_updates} is fewer than the {self.epoch} epoch(s) and "
                             f"{self.update_in_epoch} update(s) done")
        if not (_is_count(self.best_epoch, -1) and self.best_epoch < max(self.epoch, 0)):
            raise ValueError(f"best_epoch {self.best_epoch!r} is not an epoch done (of {self.epoch})")
        if not (_is_number(self.best_acc1) and -1 <= self.best_acc1 <= 100):
            raise ValueError(f"best_acc1 {self.best_acc1!r} is not an accuracy in %")
        if not isinstance(self.pending, dict) or (self.pending and self.epoch == 0) or not all(
                isinstance(k, str) and len(k) <= 64 and _is_number(v) for k, v in self.pending.items()):
            raise ValueError("pending is not the finite statistics of a finished epoch")
        if self.partial:
            self._check_partial()

    def _check_partial(self) -> None:
        partial = self.partial
        keys = {"loss_sum", "micro_batches", "images", "elapsed"}
        if not isinstance(partial, dict) or set(partial) != keys or not self.update_in_epoch:
            raise ValueError("partial is not the statistics of an epoch in progress")
        sums, batches, images = partial["loss_sum"], partial["micro_batches"], partial["images"]
        if not (isinstance(sums, list) and isinstance(batches, list) and isinstance(images, list) and
                0 < len(sums) == len(batches) == len(images) <= 1 << 16 and all(map(_is_number, sums)) and
                all(map(_is_count, batches)) and all(map(_is_count, images)) and _is_number(partial["elapsed"]) and
                partial["elapsed"] >= 0):
            raise ValueError("partial is not the statistics of an epoch in progress")

    def carried(self, process: int, processes: int) -> Dict[str, Any]:
        """This process's statistics of the epoch in progress, as saved (zeros at an epoch's start, or when the
        checkpoint was written by another number of processes)."""
        partial = self.partial
        if not (self.update_in_epoch and partial and len(partial["loss_sum"]) == processes):
            return {"loss_sum": 0.0, "micro_batches": 0, "images": 0, "elapsed": 0.0}
        return {"loss_sum": partial["loss_sum"][process], "micro_batches": partial["micro_batches"][process],
                "images": partial["images"][process], "elapsed": partial["elapsed"]}


def name_position(name: str) -> Optional[Tuple[int, int]]:
    """(epoch, update_in_epoch) a checkpoint folder's name says, or None for a name train.py does not write."""
    match = _NAME.match(name)
    return (int(match[1]), int(match[2] or match[3] or 0)) if match else None


def checkpoint_name(state: TrainState) -> str:
    """Folder name that says how much training is done (and sorts by it): ``epoch-0003`` after 3 epochs,
    ``epoch-0003-plus-000120-updates`` 120 updates into the 4th."""
    name = f"epoch-{state.epoch:04d}"
    return f"{name}-plus-{state.update_in_epoch:06d}-updates" if state.update_in_epoch else name


def best_name(state: TrainState) -> Optional[str]:
    """The checkpoint written right after the best epoch (what ``best`` points to), or None before any eval."""
    return f"epoch-{state.best_epoch + 1:04d}" if state.best_epoch >= 0 else None


def parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite (one host sync: called before a save, not per update)."""
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    return bool(torch.stack(flags).all().item()) if flags else True


def _write_json(path: Path, obj: Any) -> None:
    write_new(path, json.dumps(obj, indent=1).encode())


def relink(root: Path, link: str, target: str) -> None:
    """Point ``root/link`` at ``target`` atomically (a fresh link renamed over the old one)."""
    tmp = root / f".{link}.tmp"
    remove_entry(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, root / link)  # replaces the link itself, whatever it pointed to


def checkpoint_names(root: Path) -> List[str]:
    """Checkpoint folder names under root, oldest first (links are not checkpoints)."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if _NAME.match(p.name) and p.is_dir() and not p.is_symlink()),
                  key=name_position)


def link_target(root: Path, link: str) -> Optional[str]:
    """The checkpoint ``root/link`` (``last`` or ``best``) points to, None if there is no such link; a link that is
    not the project's own (a checkpoint folder beside it) is refused with one message naming it."""
    path = Path(root) / link
    if not os.path.lexists(path):
        return None
    target = os.readlink(path) if path.is_symlink() else None
    if target is None or not _NAME.match(target):
        what = f"a link to {target}" if target is not None else "not a link"
        raise UnsafeFileError(f"{path} is {what}, not train.py's link to a checkpoint beside it: delete it, then "
                              f"rerun the command with --resume {Path(root).parent}")
    return target


def repair_links(root: Path, state: TrainState) -> None:
    """Point ``best`` at the best epoch's checkpoint when it exists (a kill may have come before the link)."""
    name = best_name(state)
    link = Path(root) / "best"
    if name and (Path(root) / name).is_dir() and not (link.is_symlink() and os.readlink(link) == name):
        relink(Path(root), "best", name)


def settle_resume(accelerator, root: Path, state: TrainState, checkpoint: Path) -> bool:
    """After loading ``checkpoint``: point ``last`` at it when it is this run's (a fallback skipped the one ``last``
    named, which is no good one to name or resume from) and repoint ``best`` from its verified train state (never from
    log.txt, which anyone can edit); True when the checkpoint's last epoch awaits its evaluation (an epoch's checkpoint
    is written before it): that epoch is then evaluated again, whether or not log.txt has its line, so the best
    accuracy counts only what the run computed."""
    if accelerator.is_main_process:
        if Path(checkpoint).parent.resolve() == Path(root).resolve() and link_target(root, "last") != checkpoint.name:
            relink(root, "last", checkpoint.name)
        repair_links(root, state)
    return bool(state.pending)


def _prune(root: Path, keep: int, state: TrainState) -> None:
    protected = {os.readlink(root / link) for link in ("last", "best") if (root / link).is_symlink()}
    protected.add(best_name(state))
    names = checkpoint_names(root)
    for name in names[:-keep] if keep > 0 else names:
        if name not in protected:
            shutil.rmtree(root / name, ignore_errors=True)


def _gather_partial(accelerator, state: TrainState) -> Dict[str, Any]:
    """The statistics of the epoch in progress on every process (a collective: all processes call it), for the
    checkpoint; {} at an epoch's end."""
    if not state.update_in_epoch or state.live is None:
        return {}
    loss_sum, micro_batches, images, elapsed = state.live()
    mine = torch.stack([loss_sum.detach().reshape(()).double(),
                        torch.tensor(float(micro_batches), dtype=torch.float64, device=loss_sum.device),
                        torch.tensor(float(images), dtype=torch.float64, device=loss_sum.device)])
    every = accelerator.gather(mine.reshape(1, 3)).reshape(-1, 3).tolist()
    return {"loss_sum": [row[0] for row in every], "micro_batches": [int(row[1]) for row in every],
            "images": [int(row[2]) for row in every], "elapsed": float(elapsed)}


def save_checkpoint(accelerator, root: Path, state: TrainState, *, model: torch.nn.Module, ema=None,
                    is_best: bool = False, keep: int = 1, run_args: Optional[bytes] = None) -> Path:
    """Save the training state (all processes call this) as ``root/<name>``; point ``last`` (and ``best``) at it.
    ``run_args``: the run's args.yaml as this run started, kept in the checkpoint (covered by its manifest), so that
    a resume finds any later edit of the run's args.yaml.

    Parameters that are not finite are never written: FloatingPointError, the previous checkpoint untouched. A disk
    that is full or read-only is one CheckpointError naming the folder and the free space, and no ``.tmp-*`` folder
    is left. Nothing is written through a link: ``root`` must be a real folder of the run, which this process must
    still hold (a run folder deleted or replaced under a running run stops it).
    """
    root = Path(root)
    name = checkpoint_name(state)
    final = root / name
    if not parameters_finite(model):
        last = root / "last"
        good = f"the last good checkpoint is {last.resolve()}" if last.is_symlink() else "there is no checkpoint yet"
        raise FloatingPointError(f"the parameters are not finite at update {state.num_updates}: training diverged "
                                 f"and nothing was saved; {good} (continue with --resume {root.parent} "
                                 "--resume-override and a lower --lr)")

    state.partial = _gather_partial(accelerator, state)

    def private() -> Path:
        """Where this checkpoint is written: a folder of ``root`` no one else can enter, as Accelerate's save_state
        writes its files by name (a link planted in a folder it writes into would be written through)."""
        check_still_held(root.parent)
        refuse_link(root, f"Delete the link, then rerun the command with --resume {root.parent}")
        try:
            root.mkdir(exist_ok=True)  # not parents: a run folder that vanished is not made again
            for leftover in root.glob(".tmp-*"):  # of a kill: removed (a link, never what it points to)
                remove_entry(leftover)
            return private_folder(root, f".tmp-{name}-")
        except OSError as e:
            raise _cannot_save(root, name, e) from None

    tmp = on_main(accelerator, private)  # refused on the main process: every process stops
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            _write_json(tmp / "train_state.json", state.state_dict())
            if run_args is not None:
                write_new(tmp / RUN_ARGS, run_args)
            if ema is not None:
                export_weights(plain_state_dict(ema), tmp / "ema.safetensors")
        accelerator.wait_for_everyone()  # every process has written its RNG state before the manifest is made
        if accelerator.is_main_process:
            files = {}
            for p in sorted(tmp.iterdir()):
                info = p.lstat()
                if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:  # what no writer of this run makes
                    raise UnsafeFileError(f"{p} is not a file this run wrote (a link, or not a file): checkpoint "
                                          f"{name} is not kept. Rerun the command with --resume {root.parent}")
                files[p.name] = {"bytes": info.st_size, "sha256": sha256_file(p, info.st_size)}
            _write_json(tmp / MANIFEST, {"format": _FORMAT, "world_size": accelerator.num_processes, "files": files})
            os.chmod(tmp, 0o777 & ~current_umask())  # sealed: readable as any folder of the run
            remove_entry(final)  # the same point saved again (e.g. preempted twice at one update): replaced
            os.replace(tmp, final)
    except Exception as e:  # a full disk: OSError, torch's RuntimeError("... unexpected pos ..."), SafetensorError
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            check_still_held(root.parent)  # the folder deleted during the save: that is the message
        if isinstance(e, UnsafeFileError):
            raise
        raise _cannot_save(root, name, e) from None
    if accelerator.is_main_process:
        relink(root, "last", name)
        if is_best:
            relink(root, "best", name)
        _prune(root, keep, state)
    accelerator.wait_for_everyone()
    return final


def _cannot_save(root: Path, name: str, error: BaseException) -> CheckpointError:
    """The one message for a checkpoint that could not be written (a full or read-only disk)."""
    last = root / "last"
    kept = f"the previous checkpoint {last.resolve()} is intact" if last.is_symlink() else "no checkpoint yet"
    return CheckpointError(f"cannot write checkpoint {name} in {root}: {disk_problem(root, error)}; {kept}. Free "
                           f"space (or fix the permissions), then rerun the command with --resume {root.parent}")


def _check_manifest(manifest: Any) -> Dict[str, Dict[str, Any]]:
    """The manifest's file entries, or ValueError if it is not one train.py writes."""
    if not isinstance(manifest, dict):
        raise ValueError
    files, world = manifest.get("files"), manifest.get("world_size", 1)
    if manifest.get("format") != _FORMAT or not isinstance(files, dict) or not 0 < len(files) <= MAX_FILES or not (
            _is_count(world, 1) and world <= 1 << 16):
        raise ValueError
    for file_name, entry in files.items():
        if not (_FILE_NAME.match(file_name) and isinstance(entry, dict) and _is_count(entry.get("bytes")) and
                entry["bytes"] <= MAX_FILE_BYTES and isinstance(entry.get("sha256"), str) and
                re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise ValueError
    return files


class _Unusable(CheckpointError):
    """A checkpoint whose files do not match its manifest, or do not fit the model and optimizer: an older one is
    tried."""


def _listed_files(folder: Path) -> Dict[str, Dict[str, Any]]:
    """The file entries of a checkpoint's manifest, which must list what a resume reads; _Unusable otherwise."""
    manifest_path = folder / MANIFEST
    if not os.path.lexists(manifest_path):
        raise _Unusable(f"{folder}: no {MANIFEST} (the checkpoint was not completely written)")
    try:
        files = _check_manifest(read_json(manifest_path))
    except UnsafeFileError as e:
        raise _Unusable(f"{e} (not the manifest train.py writes)") from None
    except (ValueError, TypeError, AttributeError):
        raise _Unusable(f"{manifest_path}: damaged (not the manifest train.py writes)") from None
    missing = sorted({"model.safetensors", "optimizer.bin", "train_state.json"} - set(files))
    if missing:
        raise _Unusable(f"{manifest_path}: lists no {', '.join(missing)}")
    return files


def _train_state(folder: Path, data: bytes) -> TrainState:
    """The train state of ``train_state.json`` bytes, which must be one a run writes at the position the folder's name
    says; _Unusable naming the file otherwise."""
    path = folder / "train_state.json"
    try:
        state = TrainState()
        state.load_state_dict(parse_json(data, path))
    except (ValueError, TypeError) as e:
        raise _Unusable(f"{path}: not a train state train.py writes ({e})") from None
    position = name_position(folder.name)
    if position is not None and position != (state.epoch, state.update_in_epoch):
        raise _Unusable(f"{path}: says epoch {state.epoch}, update {state.update_in_epoch}, where the folder's name "
                        f"says epoch {position[0]}, update {position[1]}")
    return state


def verify_checkpoint(folder: Path) -> Optional[str]:
    """None if the folder's files match its manifest and its train state is one a run writes at the position its
    name says, else what is wrong (one line, naming the file). Every file is bounded before it is parsed or hashed:
    regular files only (no links), sizes as the manifest says and within MAX_FILE_BYTES."""
    folder = Path(folder)
    try:
        files = _listed_files(folder)
        for file_name, entry in files.items():
            path = folder / file_name
            if not os.path.lexists(path):
                return f"{path}: missing"
            if sha256_file(path, entry["bytes"]) != entry["sha256"]:
                return f"{path}: content differs from the manifest's SHA-256 (damaged or replaced)"
        _train_state(folder, read_exact(folder / "train_state.json", files["train_state.json"]["bytes"]))
    except (CheckpointError, UnsafeFileError) as e:
        return str(e)
    return None


def checkpoint_args(folder: Path) -> Optional[bytes]:
    """The run's args.yaml as it was when the run that wrote ``folder`` started (read once and hashed against the
    manifest), or None for a checkpoint written before checkpoints carried it."""
    files = _listed_files(Path(folder))
    return _read_listed(Path(folder), files, RUN_ARGS) if RUN_ARGS in files else None


def resolve_resume(path: str, *, log: Callable[[str], None] = print) -> Tuple[Optional[Path], Optional[Path]]:
    """Turn ``--resume PATH`` into (verified checkpoint folder or None, run folder or None).

    PATH is a run folder (the checkpoint ``last`` points to, else the newest; if it does not verify, the newest older
    one that does, each one skipped told with the reason), its ``checkpoints/`` folder, or one checkpoint folder
    (which must verify). Checkpoints newer than ``last`` (a kill between writing one and pointing ``last`` at it) are
    not used: training writes them again. A run folder that has no checkpoint yet (stopped before its first,
    however early) gives ``(None, run)``: the run starts again from the beginning.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--resume {path}: no such file or folder; pass a train.py run folder or a checkpoint "
                          "folder inside its checkpoints/")
    if p.is_dir() and (p.name == "checkpoints" or any(os.path.lexists(p / n) for n in ("checkpoints", "args.yaml",
                                                                                        LOCK_NAME))):
        run = p.parent if p.name == "checkpoints" else p
        refuse_link(run, f"Pass the real folder: --resume {os.path.realpath(run)}")
        root = run / "checkpoints"
        refuse_link(root, f"A run's checkpoints/ must be its own folder: resume the run it belongs to, or delete the "
                          f"link and rerun the command with --resume {run}")
        names = checkpoint_names(root)
        if not names:
            return None, run.resolve()
        last = link_target(root, "last")
        if last in names:
            newer = [n for n in names if name_position(n) > name_position(last)]
            if newer:
                log(f"note: not using {', '.join(newer)} in {root}: newer than `last` (written just before a kill); "
                    "training writes them again")
            names = [n for n in names if name_position(n) <= name_position(last)]
        problems = []
        for name in reversed(names):
            problem = verify_checkpoint(root / name)
            if problem is None:
                for skipped in problems:
                    log(f"note: skipped {skipped}")
                return (root / name).resolve(), run.resolve()
            problems.append(problem)
        raise CheckpointError(f"--resume {path}: no intact checkpoint: " + "; ".join(problems) +
                              f". Start the run again in a new folder: rerun the command with --output-dir "
                              f"{run.resolve()}-restart and without --resume")
    if p.is_dir() and _NAME.match(p.resolve().name):
        folder = p.resolve()
        problem = verify_checkpoint(folder)
        if problem is not None:
            raise CheckpointError(f"--resume {path}: {problem}; pass its run folder instead to fall back to the newest "
                                  "intact checkpoint")
        run = folder.parent.parent if folder.parent.name == "checkpoints" else None
        return folder, run
    raise ConfigError(f"--resume {path}: not a train.py run folder or checkpoint (no args.yaml, no checkpoints/, no "
                      "manifest.json); pass the run folder train.py printed at its start")


def older_checkpoints(folder: Path) -> List[Path]:
    """The checkpoints beside ``folder`` that are older than it, newest first: where a resume falls back to."""
    folder = Path(folder)
    position = name_position(folder.name)
    names = [n for n in checkpoint_names(folder.parent) if position is not None and name_position(n) < position]
    return [folder.parent / n for n in reversed(names)]


def _read_listed(folder: Path, files: Dict[str, Dict[str, Any]], name: str) -> bytes:
    """A file the manifest lists, opened once (not followed if a link, a regular file of the listed size), read into
    memory and hashed: the bytes returned are the ones that match the manifest, and the only ones parsed."""
    path = folder / name
    data = read_exact(path, files[name]["bytes"])
    if hashlib.sha256(data).hexdigest() != files[name]["sha256"]:
        raise UnsafeFileError(f"{path}: content differs from the manifest's SHA-256 (damaged or replaced)")
    return data


def checkpoint_weights(folder: Path, name: str) -> Optional[Dict[str, torch.Tensor]]:
    """The tensors of a checkpoint's ``model.safetensors`` or ``ema.safetensors``, parsed from the bytes that match its
    manifest (None when the manifest lists no such file): what an export writes."""
    files = _listed_files(Path(folder))
    if name not in files:
        return None
    return parse_safetensors(_read_listed(Path(folder), files, name), Path(folder) / name)


def _unpickle(data: bytes, path: Path) -> Any:
    """torch.load(weights_only=True) of bytes, numpy's RNG arrays the only extra types; a pickle of anything else is
    refused."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy array/dtype reconstruction, nothing callable else

    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a foreign global; anything else for a damaged file
        # torch's own text advises weights_only=False: the wrong advice for a file that was refused for safety.
        raise ValueError(f"refusing to load {path}: it is not the plain tensors and numbers train.py writes "
                         f"({type(e).__name__}); nothing in it was run") from None


def _setting(value: Any) -> bool:
    """Whether a value is one an optimizer's settings hold: None, a flag, a short name, a finite number, or a tuple."""
    if value is None or type(value) in (bool, int) or (isinstance(value, str) and len(value) <= 64):
        return True
    if type(value) is float:
        return math.isfinite(value)
    return isinstance(value, (tuple, list)) and len(value) <= 16 and all(map(_setting, value))


def _finite(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex()) or bool(torch.isfinite(tensor).all())


# Optimizer state entries shaped as their parameter (torch's and timm's Adam(W), LAMB, SGD, Lion, Adan): a factored
# optimizer's (Adafactor's row and column moments) are other tensors, never larger than their parameter.
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "exp_avg_diff", "neg_pre_grad")


def _check_optimizer_state(saved: Any, optimizer) -> None:
    """ValueError saying what in a saved optimizer state ``optimizer`` cannot take: another number of parameter
    groups or of parameters in a group, indices that are not 0..N-1 once each, a state tensor not shaped as its
    parameter, a step that is not a finite count, a value that is not finite."""
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and
            isinstance(saved.get("param_groups"), list)):
        raise ValueError("not an optimizer state (state and param_groups)")
    groups, params = optimizer.param_groups, {}
    if len(saved["param_groups"]) != len(groups):
        raise ValueError(f"{len(saved['param_groups'])} parameter group(s) where the optimizer has {len(groups)} "
                         "(saved with another --opt or --first-layer-opt?)")
    for number, (group, live) in enumerate(zip(saved["param_groups"], groups)):
        indices = group.get("params") if isinstance(group, dict) else None
        if not (isinstance(indices, list) and all(type(i) is int for i in indices)):
            raise ValueError(f"parameter group {number} lists no parameter indices")
        if len(indices) != len(live["params"]):
            raise ValueError(f"parameter group {number} has {len(indices)} parameters where the optimizer's has "
                             f"{len(live['params'])}")
        bad = next((k for k, v in group.items() if k != "params" and not (isinstance(k, str) and _setting(v))), None)
        if bad is not None:
            raise ValueError(f"parameter group {number}'s {str(bad)[:64]} is not a finite setting")
        params.update(zip(indices, live["params"]))
    if sorted(params) != list(range(sum(len(g["params"]) for g in groups))):
        raise ValueError("its parameter indices are not 0..N-1, each once")
    for index, entry in saved["state"].items():
        if index not in params or not isinstance(entry, dict):
            raise ValueError(f"it holds a state for parameter {str(index)[:20]}, which no group lists")
        param = params[index]
        for key, value in entry.items():
            where = f"parameter {index}'s {str(key)[:64]}"
            if key == "step":
                step = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if not (type(step) in (int, float) and math.isfinite(step) and 0 <= step < _COUNT):
                    raise ValueError(f"{where} is not a count of updates")
            elif isinstance(value, torch.Tensor):
                if key in _PARAM_SHAPED and value.shape != param.shape:
                    raise ValueError(f"{where} has shape {list(value.shape)}, the parameter {list(param.shape)}")
                if value.numel() > param.numel():
                    raise ValueError(f"{where} has {value.numel()} values, more than its parameter's {param.numel()}")
                if not _finite(value):
                    raise ValueError(f"{where} is not finite")
            elif not _setting(value):
                raise ValueError(f"{where} is not a tensor or a finite setting")


def _check_random_states(rng: Any) -> None:
    """ValueError unless ``rng`` holds the random states train.py restores, each of its type and size."""
    import numpy as np

    if not isinstance(rng, dict):
        raise ValueError("not a mapping of random states")
    py = rng.get("random_state")
    if not (isinstance(py, tuple) and len(py) == 3 and py[0] == 3 and isinstance(py[1], tuple) and len(py[1]) == 625
            and all(type(x) is int and 0 <= x < 1 << 32 for x in py[1]) and py[1][-1] <= 624 and
            (py[2] is None or type(py[2]) is float)):
        raise ValueError("random_state is not Python's generator state (version 3, 625 words)")
    state = rng.get("numpy_random_seed")
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == "MT19937" and
            isinstance(state[1], np.ndarray) and state[1].dtype == np.uint32 and state[1].shape == (624,) and
            type(state[2]) is int and 0 <= state[2] <= 624 and state[3] in (0, 1) and type(state[4]) is float):
        raise ValueError("numpy_random_seed is not numpy's generator state (MT19937, 624 words)")
    cpu = rng.get("torch_manual_seed")
    if not (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.shape == torch.get_rng_state().shape):
        raise ValueError("torch_manual_seed is not torch's CPU generator state")
    cuda = rng.get("torch_cuda_manual_seed", [])
    if not (isinstance(cuda, (list, tuple)) and len(cuda) <= 1 << 12 and all(
            isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 and t.numel() <= 1 << 16
            for t in cuda)):
        raise ValueError("torch_cuda_manual_seed is not a list of CUDA generator states")


@dataclass
class _Read:
    """A checkpoint read and checked, nothing applied yet: what every process agrees on before loading it."""

    weights: Dict[str, torch.Tensor]
    optimizer: Dict[str, Any]
    state: TrainState
    scaler: Optional[Dict[str, Any]] = None
    ema: Optional[Dict[str, torch.Tensor]] = None
    rng: Optional[Dict[str, Any]] = None
    notes: List[str] = field(default_factory=list)


def _read_checkpoint(accelerator, folder: Path, *, model: torch.nn.Module, optimizer, ema, exact: bool) -> _Read:
    """Everything this process loads from ``folder``, each file opened once, hashed and parsed from the same bytes,
    then checked against the model and the optimizer; _Unusable says what does not fit (the fallback goes on to an
    older checkpoint), CheckpointError what no older checkpoint changes (another number of processes)."""
    files = _listed_files(folder)
    path = folder / "train_state.json"
    try:
        state = _train_state(folder, _read_listed(folder, files, path.name))
        path = folder / "model.safetensors"
        net = accelerator.unwrap_model(model)
        weights = parse_safetensors(_read_listed(folder, files, path.name), path, net.state_dict())
        bad = [k for k, v in weights.items() if not _finite(v)]
        if bad:
            raise ValueError(f"holds weights that are not finite ({', '.join(bad[:3])}): the run had diverged")
        path = folder / "optimizer.bin"
        saved = _unpickle(_read_listed(folder, files, path.name), path)
        _check_optimizer_state(saved, optimizer)
        read = _Read(weights, saved, state)
        if accelerator.scaler is not None and "scaler.pt" in files:
            path = folder / "scaler.pt"
            read.scaler = _unpickle(_read_listed(folder, files, path.name), path)
            if not (isinstance(read.scaler, dict) and all(_setting(v) for v in read.scaler.values())):
                raise ValueError("is not a grad scaler's state")
        if ema is not None and "ema.safetensors" in files:
            path = folder / "ema.safetensors"
            read.ema = parse_safetensors(_read_listed(folder, files, path.name), path, ema.state_dict())
            if not all(map(_finite, read.ema.values())):
                raise ValueError("holds EMA weights that are not finite")
        elif ema is not None:
            read.notes.append(f"note: {folder} has no EMA weights; the EMA starts again from the current weights")
        rng_file = f"random_states_{accelerator.process_index}.pkl"
        if rng_file in files:
            path = folder / rng_file
            read.rng = _unpickle(_read_listed(folder, files, rng_file), path)
            _check_random_states(read.rng)
    except (ValueError, WeightsError) as e:  # UnsafeFileError (a ValueError) and WeightsError name their file
        named = str(path) in str(e)
        raise _Unusable(str(e) if named else f"{path}: {e}") from None
    if read.rng is None:
        writers = sum(bool(re.fullmatch(r"random_states_[0-9]+[.]pkl", name)) for name in files)
        message = (f"{folder} has no random state for process {accelerator.process_index} (it was written by "
                   f"{writers} process(es), this run has {accelerator.num_processes})")
        if exact:
            raise CheckpointError(f"{message}: the resumed run would not be the uninterrupted one. Resume with the "
                                  "run's number of processes, or add --resume-inexact to continue anyway")
        read.notes.append(f"warning: {message}; continuing with fresh random states: the run is no longer exact")
    return read


def load_checkpoint(accelerator, folder: Path, *, model: torch.nn.Module, optimizer, state: TrainState, ema=None,
                    exact: bool = True, fallbacks: Sequence[Path] = (), log: Callable[[str], None] = print) -> Path:
    """Restore a checkpoint: model, optimizer, grad scaler, EMA, train state and this process's RNG state; return the
    folder restored.

    Each file is opened once (never through a link, a regular file of the manifest's size), hashed, and parsed from
    the same bytes, so what was verified is what is loaded: Accelerate's ``load_state`` is not used, because it reads
    the files again by name (and unpickles registered objects with ``weights_only=False``). Before anything is
    applied, the safetensors headers are checked (within bounds, the model's names, dtypes and shapes), the weights
    finite, the optimizer state against the optimizer, the RNG state's types and sizes, on every process; when a
    process finds ``folder`` unusable, all go on to the first of ``fallbacks`` (older checkpoints, newest first) that
    is usable, each skipped told with its reason. Without this process's RNG state (the run had another number of
    processes) the resume is refused unless ``exact=False``, which continues with a warning that the run is no longer
    the uninterrupted one.
    """
    import random

    import numpy as np
    from accelerate.utils import gather_object

    skipped = []
    for candidate in [Path(folder), *map(Path, fallbacks)]:
        try:
            read, problem = _read_checkpoint(accelerator, candidate, model=model, optimizer=optimizer, ema=ema,
                                             exact=exact), None
        except CheckpointError as e:
            read, problem = None, (isinstance(e, _Unusable), str(e))
        problems = [p for p in (gather_object([problem]) if accelerator.num_processes > 1 else [problem]) if p]
        fatal = next((text for usable_elsewhere, text in problems if not usable_elsewhere), None)
        if fatal:
            raise CheckpointError(fatal)
        if not problems:
            break
        skipped.append(problems[0][1])
    else:
        if not fallbacks:
            raise CheckpointError(f"{skipped[0]}; pass its run folder instead to fall back to the newest intact "
                                  "checkpoint")
        run = Path(folder).parent.parent
        raise CheckpointError(f"no usable checkpoint in {run}: " + "; ".join(skipped) + ". Start the run again in a "
                              f"new folder: rerun the command with --output-dir {run}-restart and without --resume")
    for problem in skipped:
        log(f"note: skipped {problem}")
    for note in read.notes:
        log(note)
    accelerator.unwrap_model(model).load_state_dict(read.weights, strict=True)
    optimizer.load_state_dict(read.optimizer)
    if read.scaler is not None:
        accelerator.scaler.load_state_dict(read.scaler)
    if ema is not None:
        if read.ema is not None:
            ema.load_state_dict(read.ema)
        else:
            ema.module.load_state_dict(accelerator.unwrap_model(model).state_dict())
    for key in (f.name for f in fields(TrainState)):
        setattr(state, key, getattr(read.state, key))
    if read.rng is not None:
        random.setstate(read.rng["random_state"])
        np.random.set_state(read.rng["numpy_random_seed"])
        torch.set_rng_state(read.rng["torch_manual_seed"])
        if accelerator.device.type == "cuda":
            _restore_cuda_rng(list(read.rng.get("torch_cuda_manual_seed") or []), accelerator.device,
                              candidate / f"random_states_{accelerator.process_index}.pkl", exact=exact, log=log)
    return candidate


def _cuda_rng_offset(state: torch.Tensor) -> Optional[int]:
    """How far a CUDA (Philox) generator state has advanced: the int64 after its uint64 seed (None: not one)."""
    return int.from_bytes(bytes(state.tolist()[8:16]), "little", signed=True) if state.numel() == 16 else None


def _restore_cuda_rng(saved: List[torch.Tensor], device: torch.device, path: Path, *, exact: bool,
                      log: Callable[[str], None]) -> None:
    """Restore this process's CUDA generator, and only it, from the states Accelerate saved for every visible GPU.

    The saving process drew only on its own GPU, whose index the file does not record: its state is the one that
    advanced (the others still stand where ``set_seed`` put them, or are all alike). When that cannot be told (states
    of several GPUs advanced), the resume is refused unless ``exact=False``, as for a missing state.
    """
    advanced = [state for state in saved if _cuda_rng_offset(state)]
    if len(saved) == 1 or len(advanced) == 1:
        state = (advanced or saved)[0]
    elif saved and not advanced and all(torch.equal(state, saved[0]) for state in saved):
        state = saved[0]  # nothing was drawn on any GPU: every state is the one set_seed gave
    else:
        state = None
    if state is not None:
        torch.cuda.set_rng_state(state, device)
        return
    message = (f"{path} holds no CUDA random state (it was written without CUDA)" if not saved else
               f"{path} holds {len(saved)} CUDA random states of which {len(advanced)} advanced: which one was this "
               f"process's GPU ({device}) cannot be told")
    if exact:
        raise CheckpointError(f"{message}: the resumed run would not be the uninterrupted one. Resume on the run's "
                              "own GPU layout, or add --resume-inexact to continue anyway")
    log(f"warning: {message}; continuing with a fresh CUDA random state: the run is no longer exact")


def export_weights(state_dict: Dict[str, torch.Tensor], path: Path, run: Optional[Path] = None) -> None:
    """Write a plain state_dict as safetensors, atomically and never through a link (write_private); a failed write
    (a full disk) leaves no partial file and is one message naming the file and the run to resume (``run``, else the
    file's folder)."""
    from safetensors.torch import save_file

    path = Path(path)
    try:
        write_private(path, lambda name: save_file(state_dict, str(name), metadata={"format": "pt"}))
    except Exception as e:
        raise write_failed(path, e, run or path.parent) from None


def export_timm_config(model: torch.nn.Module, path: Path, *, architecture: str, label_names: List[str],
                       data_config: Dict[str, Any]) -> None:
    """Write ``config.json`` beside an exported ``model.safetensors`` (atomically, never through a link), so that
    ``timm.create_model("local-dir:FOLDER", pretrained=True)`` rebuilds and loads the model and
    ``timm.data.resolve_data_config(model=...)`` gives the run's eval preprocessing: timm's own ``save_config_for_hf``
    with the architecture, its kwargs, num_classes, ``label_names`` and ``data_config`` (input_size, mean, std,
    crop_pct, interpolation, crop_mode). What describes timm's own pretrained weights of the architecture
    (``WEIGHTS_METADATA``: tag, license, paper) is left out: the run never loaded them."""
    from timm.models._hub import save_config_for_hf  # what timm's save_for_hf / push_to_hf_hub write

    path = Path(path)
    pretrained_cfg = model.pretrained_cfg
    model.pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k not in WEIGHTS_METADATA}
    try:
        write_private(path, lambda name: save_config_for_hf(
            model, str(name), model_config={"pretrained_cfg": {"architecture": architecture},
                                            "label_names": list(label_names)}, data_config=data_config))
    except Exception as e:
        raise write_failed(path, e, path.parent) from None
    finally:
        model.pretrained_cfg = pretrained_cfg
