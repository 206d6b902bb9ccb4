"""Pretrained weights: read a state_dict from any supported format and adapt it to the model being finetuned.

Formats: a train.py output folder or an Accelerate `save_state` folder (`model.safetensors`, or `pytorch_model.bin`
when saved with safe_serialization=False), a `.safetensors` file, and torch pickles (`.pth`, `.pt`, `.bin`, ...)
holding a plain state_dict (timm / Hugging Face Hub weights), a DeiT / DeiT III checkpoint (`{'model': ...}`) or a
timm training checkpoint (`{'state_dict': ...}`). Pickles are read with `torch.load(weights_only=True)`: tensors and
plain containers only, so a file that would run code when unpickled is refused, never executed.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from tract.errors import WeightsError

__all__ = ["load_state_dict", "adapt_state_dict", "load_pretrained"]

# Looked up in this order in a folder: train.py output and Accelerate save_state write the first, Accelerate with
# safe_serialization=False the second.
FOLDER_FILES = ("model.safetensors", "pytorch_model.bin")
# Wrappers that prefix every key: DDP / DataParallel (`module.`), torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where training checkpoints keep the model weights: DeiT / DeiT III ('model'), timm train.py ('state_dict').
# Their EMA copies ('model_ema', 'state_dict_ema') are ignored: DeiT III finetunes from the model, not the EMA.
CHECKPOINT_MODEL_KEYS = ("model", "state_dict")
# DeiT and timm training checkpoints store their command line as an argparse.Namespace of plain values: safe to build.
_SAFE_PICKLE_GLOBALS = [argparse.Namespace]
_MAX_LISTED = 10

Log = Callable[[str], None]


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Plain state_dict (name -> tensor, on CPU) from any supported weights format."""
    path = Path(path)
    if path.is_dir():
        path = _weights_file_in(path)
    elif not path.exists():
        raise WeightsError(f"weights not found: {path} does not exist; pass a train.py output folder, an Accelerate "
                           f"checkpoint folder, or a .safetensors / .pth / .bin file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _read_pickle(path)
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_MODEL_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    return _as_state_dict(obj, path)


def adapt_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module, *,
                     log: Log = print) -> dict[str, torch.Tensor]:
    """Fit a state_dict to `model`; the result loads with strict=True.

    Strips DDP / torch.compile key prefixes; for a timm VisionTransformer renames DeiT III `gamma_1`/`gamma_2` to
    `ls1.gamma`/`ls2.gamma` and resamples pos_embed (bicubic) and the patch embedding to the model's grid and patch
    size; uses the model's own freshly initialised head when the class count differs (or the weights have no head).
    Anything else that does not fit raises WeightsError listing the missing, unexpected and mismatched keys.
    """
    state_dict = _strip_wrapper_prefixes(state_dict, log)
    if _is_timm_vit(model):
        state_dict = _adapt_to_vit(state_dict, model, log)
    target = model.state_dict()
    state_dict = _replace_head(state_dict, target, _head_keys(model), log)

    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [f"{k}: weights {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in state_dict.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or mismatched:
        problems = [f"{name} keys ({len(keys)}): {_listing(keys)}"
                    for name, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
                    if keys]
        raise WeightsError("the weights do not fit the model; " + "; ".join(problems) +
                           ". Build the model with the pretraining run's settings (model name, patch size, "
                           "input channels; its args.yaml has them)")
    return state_dict


def load_pretrained(model: nn.Module, path: str | Path, *, log: Log = print) -> None:
    """Load pretrained weights of any supported format into `model`, adapted to it (see adapt_state_dict)."""
    state_dict = adapt_state_dict(load_state_dict(path), model, log=log)
    model.load_state_dict(state_dict, strict=True)
    log(f"loaded pretrained weights from {path}")


def _weights_file_in(folder: Path) -> Path:
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())
    hint = (f"the run has not finished: pass its newest checkpoint, {folder / 'checkpoints' / 'last'}"
            if (folder / "checkpoints").is_dir() else "pass a train.py run folder or a weights file")
    raise WeightsError(f"no weights in folder {folder}: expected one of {', '.join(FOLDER_FILES)} (written by "
                       f"train.py or Accelerate save_state), found {_listing(found) if found else 'nothing'}; {hint}")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"cannot read {path} as safetensors ({e}); is the file complete?") from None


def _read_pickle(path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_SAFE_PICKLE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises anything from KeyError to UnpicklingError on foreign files
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise WeightsError(
                f"refusing to load {path}: besides tensors it pickles {', '.join(unsafe)}, and unpickling those "
                f"could run arbitrary code. Re-save the weights alone, e.g. torch.save(model.state_dict(), "
                f"'weights.pth') or safetensors.torch.save_file(model.state_dict(), 'model.safetensors')") from None
        # not torch's text: it advises weights_only=False, the wrong advice for a file refused for safety
        raise WeightsError(f"cannot read {path} as PyTorch weights ({type(e).__name__}): expected a torch.save file "
                           f"of tensors or a .safetensors file") from None


def _unsafe_globals(path: Path) -> list[str]:
    """Globals the pickle would import, read from its opcodes without unpickling; [] if it cannot be parsed."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch.save file at all: nothing to name
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_PICKLE_GLOBALS}
    return [n for n in names if n not in allowed]


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state_dict; save model.state_dict()")
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{path} is not a state_dict (name -> tensor) nor a checkpoint with one under "
                           f"{' or '.join(repr(k) for k in CHECKPOINT_MODEL_KEYS)}; non-tensor entries: "
                           f"{_listing(not_tensors)}")
    return dict(obj)


def _strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor], log: Log) -> dict[str, torch.Tensor]:
    out, stripped = {}, set()
    for key, value in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            prefix = next(p for p in WRAPPER_PREFIXES if name.startswith(p))
            stripped.add(prefix)
            name = name[len(prefix):]
        out[name] = value
    if stripped:
        log(f"weights: stripped key prefix {', '.join(repr(p) for p in sorted(stripped))}")
    return out


def _is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _adapt_to_vit(state_dict: dict[str, torch.Tensor], model: nn.Module, log: Log) -> dict[str, torch.Tensor]:
    """timm's own DeiT / DeiT III converter: LayerScale renames, pos_embed and patch embedding resampling."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    before = {k: tuple(state_dict[k].shape) for k in ("pos_embed", "patch_embed.proj.weight") if k in state_dict}
    renamed = any("gamma_" in k for k in state_dict)
    # antialias=False: the plain bicubic kernel of DeiT's finetuning; the antialiased one is PIL's, a different kernel.
    state_dict = checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True, antialias=False)
    if renamed:
        log("weights: renamed DeiT III LayerScale gamma_1/gamma_2 to ls1.gamma/ls2.gamma")
    for key, shape in before.items():
        if tuple(state_dict[key].shape) != shape:
            log(f"weights: resampled {key} (bicubic) from {shape} to {tuple(state_dict[key].shape)}")
    return state_dict


def _head_keys(model: nn.Module) -> set[str]:
    """State_dict keys of the classifier, found through timm's get_classifier(); empty for other models."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return set()
    heads = get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    names = [name for name, module in model.named_modules() if any(module is h for h in heads)]
    return {k for k in model.state_dict() for name in names if k.startswith(f"{name}.")}


def _replace_head(state_dict: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], head_keys: Iterable[str],
                  log: Log) -> dict[str, torch.Tensor]:
    head_keys = sorted(head_keys)
    if not head_keys or all(k in state_dict and state_dict[k].shape == target[k].shape for k in head_keys):
        return state_dict

    def shapes(sd: Mapping[str, torch.Tensor]) -> str:
        return ", ".join(f"{k} {tuple(sd[k].shape)}" for k in head_keys if k in sd) or "none"

    log(f"weights: new classifier head (weights have {shapes(state_dict)}; model has {shapes(target)})")
    return {**state_dict, **{k: target[k] for k in head_keys}}


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")
