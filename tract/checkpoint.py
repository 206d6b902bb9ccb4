"""Checkpoints: written crash-safe with a manifest, verified before use, read without unpickling code.

Layout of a run folder::

    OUTPUT/checkpoints/epoch-0003/                  after 3 full epochs
    OUTPUT/checkpoints/epoch-0004-update-000120/    mid-epoch (preemption, or an update interval)
    OUTPUT/checkpoints/last -> epoch-0004-update-000120   (symlinks, replaced atomically)
    OUTPUT/checkpoints/best -> epoch-0003

A checkpoint folder holds Accelerate's ``save_state`` files for what Accelerate does well (``model.safetensors``,
``optimizer.bin``, ``scaler.pt`` under fp16, ``random_states_<process>.pkl``), plus ``train_state.json`` (where
training stands) and ``ema.safetensors``, and last of all ``manifest.json``: every file's size and SHA-256. It is
written to ``.tmp-<name>`` and renamed only when complete, so a folder without a manifest that matches its files is
never trusted.

Loading never runs code, whatever a file holds or is named: only the files the manifest names are read, safetensors
and JSON as such and the rest with ``torch.load(weights_only=True)`` (numpy's RNG arrays are the only extra types
allowed). Accelerate's own ``load_state`` is not used because it unpickles registered objects with
``weights_only=False``.
"""
import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from tract.config import ConfigError

__all__ = ["CheckpointError", "TrainState", "checkpoint_name", "save_checkpoint", "verify_checkpoint",
           "resolve_resume", "load_checkpoint", "repair_links", "export_weights", "parameters_finite", "MANIFEST"]

MANIFEST = "manifest.json"
_FORMAT = 1
_NAME = re.compile(r"^epoch-\d{4,}(-update-\d{6,})?$")
_HASH_CHUNK = 1 << 22


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or used: the message names the folder or file and what to do."""


@dataclass
class TrainState:
    """Where training stands: ``epoch`` full epochs done plus ``update_in_epoch`` updates into the next one.

    ``pending`` holds the training stats of epoch ``epoch - 1`` until its evaluation is logged, so a run killed
    between its epoch checkpoint and its log line evaluates and logs that epoch when resumed.
    """

    epoch: int = 0
    update_in_epoch: int = 0
    num_updates: int = 0
    best_acc1: float = -1.0
    best_epoch: int = -1
    pending: Dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> Dict[str, Any]:
        """Plain values (JSON)."""
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; unknown keys are refused."""
        known = {f.name for f in fields(self)}
        unknown = set(state) - known
        if unknown:
            raise ValueError(f"unknown train-state keys {sorted(unknown)}")
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_name(state: TrainState) -> str:
    """Folder name that sorts by training progress: ``epoch-0003`` or ``epoch-0003-update-000120``."""
    name = f"epoch-{state.epoch:04d}"
    return f"{name}-update-{state.update_in_epoch:06d}" if state.update_in_epoch else name


def best_name(state: TrainState) -> Optional[str]:
    """The checkpoint written right after the best epoch (what ``best`` points to), or None before any eval."""
    return f"epoch-{state.best_epoch + 1:04d}" if state.best_epoch >= 0 else None


def parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite (one host sync: called before a save, not per update)."""
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    return bool(torch.stack(flags).all().item()) if flags else True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _relink(root: Path, link: str, target: str) -> None:
    tmp = root / f".{link}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, root / link)


def _checkpoints(root: Path) -> List[str]:
    """Checkpoint folder names under root, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _NAME.match(p.name))


def repair_links(root: Path, state: TrainState) -> None:
    """Point ``best`` at the best epoch's checkpoint when it exists (a kill may have come before the link)."""
    name = best_name(state)
    link = Path(root) / "best"
    if name and (Path(root) / name).is_dir() and not (link.is_symlink() and os.readlink(link) == name):
        _relink(Path(root), "best", name)


def _prune(root: Path, keep: int, state: TrainState) -> None:
    protected = {os.readlink(root / link) for link in ("last", "best") if (root / link).is_symlink()}
    protected.add(best_name(state))
    names = _checkpoints(root)
    for name in names[:-keep] if keep > 0 else names:
        if name not in protected:
            shutil.rmtree(root / name, ignore_errors=True)


def _disk_problem(folder: Path, error: BaseException) -> str:
    """What went wrong writing into folder, with the free space of its disk."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**30:.2f} GiB free on that disk"
    except OSError:
        free = "free space unknown"
    reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else str(error).splitlines()[0]
    return f"{reason} ({free})"


def save_checkpoint(accelerator, root: Path, state: TrainState, *, model: torch.nn.Module, ema=None,
                    is_best: bool = False, keep: int = 1) -> Path:
    """Save the training state (all processes call this) as ``root/<name>``; point ``last`` (and ``best``) at it.

    Parameters that are not finite are never written: FloatingPointError, the previous checkpoint untouched. A disk
    that is full or read-only is one CheckpointError naming the folder and the free space.
    """
    root = Path(root)
    name = checkpoint_name(state)
    final, tmp = root / name, root / f".tmp-{name}"
    if not parameters_finite(model):
        last = root / "last"
        good = f"the last good checkpoint is {last.resolve()}" if last.is_symlink() else "there is no checkpoint yet"
        raise FloatingPointError(f"the parameters are not finite at update {state.num_updates}: training diverged "
                                 f"and nothing was saved; {good} (rerun the command with --resume "
                                 f"{root.parent} and a lower --lr)")
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            _write_json(tmp / "train_state.json", state.state_dict())
            if ema is not None:
                from tract.models import plain_state_dict

                export_weights(plain_state_dict(ema), tmp / "ema.safetensors")
        accelerator.wait_for_everyone()  # every process has written its RNG state before the manifest is made
        if accelerator.is_main_process:
            files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            _write_json(tmp / MANIFEST, {"format": _FORMAT, "world_size": accelerator.num_processes, "files": files})
            if final.exists():  # the same point saved again (e.g. preempted twice at one update): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError("... unexpected pos ...")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        last = root / "last"
        kept = f"the previous checkpoint {last.resolve()} is intact" if last.is_symlink() else "no checkpoint yet"
        raise CheckpointError(f"cannot write checkpoint {name} in {root}: {_disk_problem(root, e)}; {kept}. Free "
                              f"space (or fix the permissions), then rerun the command with --resume {root.parent}"
                              ) from None
    if accelerator.is_main_process:
        _relink(root, "last", name)
        if is_best:
            _relink(root, "best", name)
        _prune(root, keep, state)
    accelerator.wait_for_everyone()
    return final


def verify_checkpoint(folder: Path) -> Optional[str]:
    """None if the folder's files match its manifest, else what is wrong (one line, naming the file)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return f"{folder}: no {MANIFEST} (the checkpoint was not completely written)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != _FORMAT or not isinstance(files, dict):
            raise ValueError
        for name, entry in files.items():
            if "/" in name or name.startswith("."):
                raise ValueError
            int(entry["bytes"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{manifest_path}: damaged (not the manifest train.py writes)"
    required = {"model.safetensors", "optimizer.bin", "train_state.json"}
    missing = sorted(required - set(files))
    if missing:
        return f"{manifest_path}: lists no {', '.join(missing)}"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
        if _sha256(path) != entry["sha256"]:
            return f"{path}: content differs from the manifest's SHA-256 (damaged or replaced)"
    return None


def _manifest(folder: Path) -> Dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST).read_text())


def resolve_resume(path: str, *, log: Callable[[str], None] = print) -> Tuple[Optional[Path], Optional[Path]]:
    """Turn ``--resume PATH`` into (verified checkpoint folder or None, run folder or None).

    PATH is a run folder (its newest checkpoint that verifies is used; each one skipped is told with the reason),
    its ``checkpoints/`` folder, or one checkpoint folder (which must verify). A run folder that has no checkpoint
    yet (stopped before its first) gives ``(None, run)``: the run starts again from the beginning.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--resume {path}: no such file or folder; pass a train.py run folder or a checkpoint "
                          "folder inside its checkpoints/")
    if p.is_dir() and (p.name == "checkpoints" or (p / "checkpoints").is_dir() or (p / "args.yaml").is_file()):
        run = p.parent if p.name == "checkpoints" else p
        root = run / "checkpoints"
        names = _checkpoints(root)
        if not names:
            return None, run.resolve()
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


def _read_pickle(path: Path) -> Any:
    """torch.load(weights_only=True), numpy's RNG arrays the only extra types; a pickle of anything else is refused."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # numpy array/dtype reconstruction, nothing callable else

    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a foreign global; anything else for a damaged file
        # torch's own text advises weights_only=False: the wrong advice for a file that was refused for safety.
        raise CheckpointError(f"refusing to load {path}: it is not the plain tensors and numbers train.py writes "
                              f"({type(e).__name__}); nothing in it was run. Resume from a checkpoint you wrote "
                              "yourself") from None


def load_checkpoint(accelerator, folder: Path, *, model: torch.nn.Module, optimizer, state: TrainState, ema=None,
                    exact: bool = True, log: Callable[[str], None] = print) -> None:
    """Restore a verified checkpoint: model, optimizer, grad scaler, EMA, train state and this process's RNG state.

    Without this process's RNG state (the run had another number of processes) the resume is refused unless
    ``exact=False``, which continues with a warning that the run is no longer the uninterrupted one.
    """
    import random

    import numpy as np
    from safetensors.torch import load_file

    folder = Path(folder)
    files = _manifest(folder)["files"]
    try:
        accelerator.unwrap_model(model).load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{folder / 'model.safetensors'} does not fit this model ({detail}): resume with the "
                              "run's own --model, --model-kwargs, --in-chans and --input-size (its args.yaml has "
                              "them)") from None
    optimizer.load_state_dict(_read_pickle(folder / "optimizer.bin"))
    if accelerator.scaler is not None and "scaler.pt" in files:
        accelerator.scaler.load_state_dict(_read_pickle(folder / "scaler.pt"))
    if ema is not None:
        if "ema.safetensors" in files:
            ema.load_state_dict(load_file(folder / "ema.safetensors"))
        else:
            log(f"note: {folder} has no EMA weights; the EMA starts again from the current weights")
            ema.module.load_state_dict(accelerator.unwrap_model(model).state_dict())
    try:
        state.load_state_dict(json.loads((folder / "train_state.json").read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder / 'train_state.json'} is not a train state ({e})") from None

    rng_file = f"random_states_{accelerator.process_index}.pkl"
    if rng_file not in files:
        message = (f"{folder} has no random state for process {accelerator.process_index} (it was written by "
                   f"{_manifest(folder).get('world_size')} process(es), this run has {accelerator.num_processes})")
        if exact:
            raise CheckpointError(f"{message}: the resumed run would not be the uninterrupted one. Resume with the "
                                  "run's number of processes, or add --resume-inexact to continue anyway")
        log(f"warning: {message}; continuing with fresh random states: the run is no longer exact")
        return
    rng = _read_pickle(folder / rng_file)
    random.setstate(rng["random_state"])
    np.random.set_state(rng["numpy_random_seed"])
    torch.set_rng_state(rng["torch_manual_seed"])
    if accelerator.device.type == "cuda":
        _restore_cuda_rng(rng.get("torch_cuda_manual_seed") or [], accelerator.device, folder / rng_file,
                          exact=exact, log=log)


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


def export_weights(state_dict: Dict[str, torch.Tensor], path: Path) -> None:
    """Write a plain state_dict as safetensors, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state_dict, str(tmp), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file owner-only; weights are meant to be shared
    os.replace(tmp, path)
