"""Checkpoints: Accelerate's save_state/load_state in crash-safe folders, resume resolution, safetensors export.

Layout of a run folder::

    OUTPUT/checkpoints/epoch-0003/                  after 3 full epochs (Accelerate save_state: model, optimizer,
    OUTPUT/checkpoints/epoch-0004-update-000120/    grad scaler, RNG states, EMA, scheduler, TrainState)
    OUTPUT/checkpoints/last -> epoch-0004-update-000120   (symlinks, replaced atomically)
    OUTPUT/checkpoints/best -> epoch-0003

Every checkpoint is written to ``.tmp-<name>`` and renamed only when all processes finished writing, so a crash
mid-write leaves no folder that ``--resume`` would trust. The newest ``--checkpoint-hist`` checkpoints are kept, plus
whatever ``last`` and ``best`` point to.
"""
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from tract.config import ConfigError

__all__ = ["TrainState", "checkpoint_name", "save_checkpoint", "resolve_resume", "export_weights"]

_NAME = re.compile(r"^epoch-\d{4,}(-update-\d{6,})?$")


@dataclass
class TrainState:
    """Where training stands: ``epoch`` full epochs done plus ``update_in_epoch`` updates into the next one."""

    epoch: int = 0
    update_in_epoch: int = 0
    num_updates: int = 0
    best_acc1: float = -1.0
    best_epoch: int = -1

    def state_dict(self) -> Dict[str, Any]:
        """Plain values, for Accelerate's register_for_checkpointing."""
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_name(state: TrainState) -> str:
    """Folder name that sorts by training progress: ``epoch-0003`` or ``epoch-0003-update-000120``."""
    name = f"epoch-{state.epoch:04d}"
    return f"{name}-update-{state.update_in_epoch:06d}" if state.update_in_epoch else name


def _relink(root: Path, link: str, target: str) -> None:
    tmp = root / f".{link}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, root / link)


def _prune(root: Path, keep: int) -> None:
    protected = {os.readlink(root / link) for link in ("last", "best") if (root / link).is_symlink()}
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _NAME.match(p.name))
    for name in names[:-keep] if keep > 0 else names:
        if name not in protected:
            shutil.rmtree(root / name, ignore_errors=True)


def save_checkpoint(accelerator, root: Path, state: TrainState, *, is_best: bool = False, keep: int = 1) -> Path:
    """Save the training state (all processes call this) as ``root/<name>``; point ``last`` (and ``best``) at it."""
    root = Path(root)
    name = checkpoint_name(state)
    final, tmp = root / name, root / f".tmp-{name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder becomes trusted
    if accelerator.is_main_process:
        if final.exists():  # the same point saved again (e.g. preempted twice at one update): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _relink(root, "last", name)
        if is_best:
            _relink(root, "best", name)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _newest_checkpoint(root: Path) -> Optional[Path]:
    last = root / "last"
    if last.is_symlink() and last.resolve().is_dir():
        return last.resolve()
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)) if root.is_dir() else []
    return root / names[-1] if names else None


def resolve_resume(path: str) -> Tuple[Path, Optional[Path]]:
    """Turn ``--resume PATH`` into (checkpoint folder, run folder or None).

    PATH is a run folder (its newest checkpoint is used), its ``checkpoints/`` folder, or one checkpoint folder.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"--resume {path}: no such file or folder; pass a train.py run folder or a checkpoint "
                          "folder inside its checkpoints/")
    for run, root in ((p, p / "checkpoints"), (p.parent, p)):
        if root.name == "checkpoints" and root.is_dir():
            ckpt = _newest_checkpoint(root)
            if ckpt is None:
                raise ConfigError(f"--resume {path}: {root} holds no complete checkpoint (the run ended before its "
                                  "first checkpoint): start it again without --resume in a new --output-dir")
            return ckpt, run
    if p.is_dir() and _NAME.match(p.resolve().name) and any(p.glob("random_states_*.pkl")):
        run = p.resolve().parent.parent if p.resolve().parent.name == "checkpoints" else None
        return p.resolve(), run
    raise ConfigError(f"--resume {path}: not a train.py run folder or checkpoint (no checkpoints/ and no "
                      "Accelerate state); pass the run folder train.py printed at its start")


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

