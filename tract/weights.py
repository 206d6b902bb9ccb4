"""Pretrained weights: read a state_dict from any supported format and adapt it to the model being finetuned.

Formats: a train.py output folder or an Accelerate `save_state` folder (`model.safetensors`, or `pytorch_model.bin`
when saved with safe_serialization=False), a `.safetensors` file, and torch pickles (`.pth`, `.pt`, `.bin`, ...)
holding a plain state_dict (timm / Hugging Face Hub weights), a DeiT / DeiT III checkpoint (`{'model': ...}`) or a
timm training checkpoint (`{'state_dict': ...}`). Pickles are read with `torch.load(weights_only=True)`: tensors and
plain containers only, so a file that would run code when unpickled is refused, never executed.
"""
from __future__ import annotations

import argparse
import io
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from tract.errors import WeightsError
from tract.safe_files import UnsafeFileError, parse_json, read_bytes, refuse_special

__all__ = ["MAX_WEIGHTS_BYTES", "MAX_SAFETENSORS_HEADER", "SAFETENSORS_DTYPES", "check_safetensors",
           "parse_safetensors", "load_state_dict", "adapt_state_dict", "load_pretrained"]

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
MAX_WEIGHTS_BYTES = 1 << 40  # one weights file (ViT-g's are a few GB); read into memory once, then parsed
MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit for its JSON header
# safetensors' dtype names (its format spec) and the torch dtypes they hold
SAFETENSORS_DTYPES = {name: dtype for name, dtype in (
    ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
    ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8),
    ("BOOL", torch.bool), ("C64", torch.complex64), ("U64", getattr(torch, "uint64", None)),
    ("U32", getattr(torch, "uint32", None)), ("U16", getattr(torch, "uint16", None)),
    ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)), ("F8_E5M2", getattr(torch, "float8_e5m2", None)))
    if dtype is not None}

Log = Callable[[str], None]


def _header(data: bytes, name: object) -> dict:
    """The JSON header of safetensors bytes, its length bounded by the file and MAX_SAFETENSORS_HEADER."""
    if len(data) < 8:
        raise WeightsError(f"{name}: {len(data)} bytes, too short for safetensors (is the file complete?)")
    length = int.from_bytes(data[:8], "little")
    if length > min(MAX_SAFETENSORS_HEADER, len(data) - 8):
        raise WeightsError(f"{name}: its safetensors header length {length} is beyond the file ({len(data)} bytes) "
                           f"or the {MAX_SAFETENSORS_HEADER}-byte limit")
    try:
        header = parse_json(data[8:8 + length], f"{name}'s safetensors header")
    except UnsafeFileError as e:
        raise WeightsError(str(e)) from None
    if not isinstance(header, dict):
        raise WeightsError(f"{name}: its safetensors header is not a mapping of tensors")
    return header


def _is_size(value: object) -> bool:
    return type(value) is int and 0 <= value < 1 << 62


def check_safetensors(data: bytes, name: object,
                      expected: Mapping[str, torch.Tensor] | None = None) -> None:
    """Raise WeightsError (one line, naming ``name``) unless ``data`` is a safetensors file within bounds, checked
    before safetensors parses it: the header length against the file and a cap, the header bounded JSON, every
    tensor's dtype known and its byte range in the file, the ranges in order, not overlapping and contiguous from the
    start of the data to its end; with ``expected`` (name -> tensor), the same names, dtypes and shapes."""
    header = _header(data, name)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        raise WeightsError(f"{name}: its safetensors __metadata__ is not a mapping of strings")
    spans = []
    for key, entry in header.items():
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            raise WeightsError(f"{name}: tensor {key[:100]!r} has no dtype, shape and data_offsets")
        dtype, shape, offsets = SAFETENSORS_DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise WeightsError(f"{name}: tensor {key[:100]!r} has an unknown dtype {str(entry['dtype'])[:20]!r}")
        if not (isinstance(shape, list) and len(shape) <= 16 and all(map(_is_size, shape))):
            raise WeightsError(f"{name}: tensor {key[:100]!r} has a shape that is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_size, offsets)) and
                offsets[0] <= offsets[1]):
            raise WeightsError(f"{name}: tensor {key[:100]!r} has data_offsets that are not [begin, end]")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != size:
            raise WeightsError(f"{name}: tensor {key[:100]!r} spans {offsets[1] - offsets[0]} bytes, its dtype and "
                               f"shape need {size}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else "leaves a gap before it"
            raise WeightsError(f"{name}: tensor {key[:100]!r} at byte {begin} {what} (ending at {end})")
        end = stop
    data_bytes = len(data) - 8 - int.from_bytes(data[:8], "little")
    if end != data_bytes:
        raise WeightsError(f"{name}: its tensors end at byte {end} of the data, which holds {data_bytes}")
    if expected is not None:
        problems = [f"missing {k}" for k in expected if k not in header]
        problems += [f"unexpected {k}" for k in header if k not in expected]
        problems += [f"{k}: {header[k]['dtype']} {header[k]['shape']} where the model has "
                     f"{str(v.dtype).replace('torch.', '')} {list(v.shape)}" for k, v in expected.items()
                     if k in header and (SAFETENSORS_DTYPES[header[k]["dtype"]] != v.dtype or
                                         header[k]["shape"] != list(v.shape))]
        if problems:
            raise WeightsError(f"{name} does not fit the model ({len(problems)} problem(s)): {_listing(problems)}")


def parse_safetensors(data: bytes, name: object,
                      expected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of safetensors bytes, checked first (check_safetensors); WeightsError naming ``name`` otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    check_safetensors(data, name, expected)
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise WeightsError(f"cannot read {name} as safetensors ({str(e)[:200]})") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Plain state_dict (name -> tensor, on CPU) from any supported weights format; the file is read once (a FIFO,
    socket or device refused before it is opened), then checked and parsed from those bytes."""
    path = Path(path)
    refuse_special(path, "weights")
    if path.is_dir():
        path = _weights_file_in(path)
    elif not path.exists():
        raise WeightsError(f"weights not found: {path} does not exist; pass a train.py output folder, an Accelerate "
                           f"checkpoint folder, or a .safetensors / .pth / .bin file")
    data = read_bytes(path, MAX_WEIGHTS_BYTES, follow=True)  # a user's weights may be a link (the Hub's cache)
    if path.suffix == ".safetensors":
        return parse_safetensors(data, path)
    obj = _read_pickle(data, path)
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


def _read_pickle(data: bytes, path: Path) -> object:
    try:
        with torch.serialization.safe_globals(_SAFE_PICKLE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises anything from KeyError to UnpicklingError on foreign files
        unsafe = _unsafe_globals(data)
        if unsafe:
            raise WeightsError(
                f"refusing to load {path}: besides tensors it pickles {', '.join(unsafe)}, and unpickling those "
                f"could run arbitrary code. Re-save the weights alone, e.g. torch.save(model.state_dict(), "
                f"'weights.pth') or safetensors.torch.save_file(model.state_dict(), 'model.safetensors')") from None
        # not torch's text: it advises weights_only=False, the wrong advice for a file refused for safety
        raise WeightsError(f"cannot read {path} as PyTorch weights ({type(e).__name__}): expected a torch.save file "
                           f"of tensors or a .safetensors file") from None


def _unsafe_globals(data: bytes) -> list[str]:
    """Globals the pickle would import, read from its opcodes without unpickling; [] if it cannot be parsed."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
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
    try:
        state_dict = checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True, antialias=False)
    except (RuntimeError, ValueError, KeyError, IndexError, AssertionError) as e:  # shapes of another architecture
        shapes = ", ".join(f"{k} {v}" for k, v in before.items())
        raise WeightsError(f"the weights are not this model's architecture ({type(model).__name__}, embed_dim "
                           f"{getattr(model, 'embed_dim', '?')}; the weights have {shapes or 'no pos_embed'}): timm's "
                           f"converter cannot adapt them ({type(e).__name__}: {str(e)[:200]}). Build the model the "
                           "weights were trained as (--model, --model-kwargs, --in-chans; a train.py run's args.yaml "
                           "has them)") from None
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
