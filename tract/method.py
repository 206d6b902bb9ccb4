"""TrAct (Petersen et al., NeurIPS 2024): train the first layer in the space of its pre-activations.

Only the first layer's weight gradient changes, to grad_W = grad_z^T X (X^T X / b + lam I)^-1, where X is the
(b, n) matrix of the layer's input rows (unfolded patches for a convolution). Forward values, the input gradient
and the bias gradient are the ordinary ones, so TrAct can be switched on and off at any point of training.

Cost: the ordinary weight gradient grad_z^T X is one GEMM on the rows built for the Gram (in float32 at least, from
upcast bf16/fp16 tensors, so the solve does not amplify the compute dtype's rounding), then it is right-multiplied
by G^-1 through a Cholesky solve (m n^2), never by inverting G or by transforming X (b n^2). The Gram is built in
backward from the input the layer saves anyway, so no activation memory is added and nothing runs in no-grad
forward passes.

Precision: the solve is exact at the asked lambda. Its products run in float32 where float32's rounding of the Gram
is negligible next to lambda (eps * trace(G) / lambda <= 1e-2: standardised or [0, 1] inputs at the paper's
lambda), else in float64 (inputs in [0, 255], a tiny lambda, nearly constant images). Which one is decided once per
layer, from the Gram of its first backward (the layer's only host read), and kept: no host read, no graph break
after it, eager and compiled alike. The weight gradient is one operator (``tract::weight_grad``) that torch.compile
calls as it is.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TrAct", "apply_tract", "remove_tract", "find_first_layer"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SUPPORTED_NAMES = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d (or subclasses that keep their forward)"
# Unfolded patches are materialised in backward in chunks of at most this many bytes (64 MiB), so a large stem
# (e.g. 7x7/2 on 224 px, batch 256) never needs the whole (b, n) matrix at once.
_CHUNK_BYTES = 1 << 26
# float32 serves where eps32 * trace(G) / lam, float32's rounding of the Gram relative to lam, is at most this: the
# relative error then measured at most 0.15 times that (e.g. 4.5e-5 at 7e-4: standardised 16-px patches of 1/f
# images, lam 0.1). Normalised inputs at the paper's lambdas (0.05-0.2) stay 5 times or more below it; [0, 255]
# inputs 100 times or more above it (benchmarks/exactness.py).
_FLOAT32_MAX_ROUNDING = 1e-2
# TrAct layers by id: tract::weight_grad (which takes no module) keeps each layer's first Gram scale on its layer.
_LAYERS: "weakref.WeakValueDictionary[int, TrAct]" = weakref.WeakValueDictionary()
_LAYER_IDS = itertools.count()
# From this n on, the Gram is built from three half-size GEMMs (a symmetric rank-k product; torch has no syrk).
_SYMMETRIC_MIN_N = 256


class _Geometry(NamedTuple):
    """What backward needs to know about a convolution (all spatial tuples have one entry per dimension)."""

    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: object  # exactly what the layer passes to F.convNd: a tuple, 'same' or 'valid'
    pads: Tuple[Tuple[int, int], ...]  # (left, right) zero padding per spatial dimension, resolved
    dilation: Tuple[int, ...]
    groups: int


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"TrAct's lam must be a finite number > 0 (the paper uses 0.1), got {lam!r}")
    return float(lam)


def _supported_base(layer: nn.Module) -> Optional[type]:
    """The torch layer class whose computation ``layer`` performs, or None if TrAct cannot wrap it."""
    for base in _BASES:
        if isinstance(layer, base):
            kept = type(layer).forward is base.forward
            if base is not nn.Linear:
                kept = kept and type(layer)._conv_forward is base._conv_forward
            return base if kept else None
    return None


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _rows_per_item(x: Tensor, geo: Optional[_Geometry]) -> int:
    """Rows of X contributed by one item of x's first dimension."""
    if geo is None:
        return 1
    out = 1
    for size, (lo, hi), k, s, d in zip(x.shape[2:], geo.pads, geo.kernel, geo.stride, geo.dilation):
        out *= (size + lo + hi - d * (k - 1) - 1) // s + 1
    return out


def _rows(x: Tensor, geo: Optional[_Geometry], start: int, stop: int, dtype: torch.dtype) -> Tensor:
    """X for items [start, stop) of x as a (groups, rows, n) tensor in ``dtype`` (at most one copy).

    The result may be a transposed view of a (groups, n, rows) buffer: matmul takes either layout for free.
    """
    if geo is None:
        return x[start:stop].to(dtype).unsqueeze(0)
    x = x[start:stop]
    if any(lo or hi for lo, hi in geo.pads):
        x = F.pad(x, [p for pair in reversed(geo.pads) for p in pair])
    dims = len(geo.kernel)
    # Windows as strided views: with kernel == stride (a ViT patch embedding) this is a pure reshape, no im2col.
    for i, (k, s, d) in enumerate(zip(geo.kernel, geo.stride, geo.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    batch, channels, g = x.shape[0], x.shape[1], geo.groups
    x = x.reshape(batch, g, channels // g, *x.shape[2:])  # (B, g, C/g, *out, *k), still a view
    spatial, offsets = tuple(range(3, 3 + dims)), tuple(range(3 + dims, 3 + 2 * dims))
    n = channels // g * math.prod(geo.kernel)
    # The copy is fast when its innermost dimension reads contiguous input: output positions for a dense (stride-1)
    # convolution, kernel offsets for a strided one such as a patch embedding.
    dense = geo.stride[-1] == 1
    x = x.permute(1, 2, *offsets, 0, *spatial) if dense else x.permute(1, 0, *spatial, 2, *offsets)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    out.copy_(x)
    return out.view(g, n, -1).mT if dense else out.view(g, -1, n)


def _grad_rows(grad_z: Tensor, geo: Optional[_Geometry], start: int, stop: int, dtype: torch.dtype) -> Tensor:
    """grad_z for items [start, stop) as (groups, rows, m/groups), rows ordered like ``_rows``."""
    groups = geo.groups if geo is not None else 1
    gz = grad_z[start:stop].movedim(1, -1) if geo is not None else grad_z[start:stop]
    return gz.reshape(-1, groups, gz.shape[-1] // groups).transpose(0, 1).to(dtype)


def _add_gram(gram: Tensor, rows: Tensor) -> None:
    """gram += rows^T rows, computing the lower-left block once: 3/4 of the GEMM work when n is large."""
    n = rows.shape[-1]
    if n < _SYMMETRIC_MIN_N:
        gram.baddbmm_(rows.mT, rows)
        return
    h = n // 2
    top, bottom = rows[..., :h], rows[..., h:]
    gram[..., :h, :h].baddbmm_(top.mT, top)
    gram[..., :h, h:].baddbmm_(top.mT, bottom)
    gram[..., h:, h:].baddbmm_(bottom.mT, bottom)
    gram[..., h:, :h] = gram[..., :h, h:].mT


def _spd_solve_right(rhs: Tensor, spd: Tensor, shift: float) -> Tensor:
    """rhs @ (spd + shift I)^-1 for batched PSD ``spd`` (modified in place), by one Cholesky factorisation.

    It succeeds wherever the rounding of ``spd`` is far below ``shift``, which the choice of dtype ensures; with no
    host read, a failure could not be seen here anyway (a non-finite result is reported by train.py's loss check).
    """
    spd.diagonal(dim1=-2, dim2=-1).add_(shift)
    chol, _ = torch.linalg.cholesky_ex(spd)
    return torch.cholesky_solve(rhs.mT, chol).mT


def _trace(spd: Tensor) -> Tensor:
    """The largest trace over the groups' matrices."""
    return spd.diagonal(dim1=-2, dim2=-1).sum(-1).amax()


def _gram_tract(grad_z: Tensor, x: Tensor, geo: Optional[_Geometry], lam: float, shape: torch.Size, sync: bool,
                dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(grad_z^T X (X^T X / b + lam I)^-1 per group, the largest trace(X^T X / b)), every product in ``dtype``; the
    ordinary weight gradient grad_z^T X is accumulated on the rows built for the Gram anyway."""
    groups = geo.groups if geo is not None else 1
    n = shape[1:].numel()
    per_item = _rows_per_item(x, geo)
    gram = torch.zeros(groups, n, n, dtype=dtype, device=x.device)
    gw = torch.zeros(groups, shape[0] // groups, n, dtype=dtype, device=x.device)
    step = max(1, _CHUNK_BYTES // (per_item * n * groups * dtype.itemsize))
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        rows = _rows(x, geo, start, stop, dtype)
        _add_gram(gram, rows)
        gw.baddbmm_(_grad_rows(grad_z, geo, start, stop, dtype).mT, rows)
    b = x.shape[0] * per_item
    if sync:
        # One all-reduce of the summed Grams and row counts: the Gram of all processes' rows together
        # (the mean of the per-process Grams when every process has the same b).
        # The count is written on the device (a fill), not copied from the host.
        packed = torch.cat([gram.flatten(), gram.new_full((1,), b)])
        dist.all_reduce(packed)
        gram, b = packed[:-1].view_as(gram), packed[-1]
    gram = gram / b
    trace = _trace(gram)
    return _spd_solve_right(gw, gram, lam).reshape(shape), trace


def _woodbury_tract(grad_z: Tensor, x: Tensor, geo: Optional[_Geometry], lam: float, shape: torch.Size,
                    dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``_gram_tract``'s result through a (b, b) system, for b < n.

    grad_z^T X (X^T X / b + lam I)^-1 = b grad_z^T (X X^T + b lam I)^-1 X (push-through identity), which unlike the
    textbook Woodbury form subtracts nothing, so it keeps float32 accuracy when X X^T dominates b lam.
    """
    rows = _rows(x, geo, 0, x.shape[0], dtype)  # (g, b, n)
    b = rows.shape[1]
    kernel = rows @ rows.mT
    trace = _trace(kernel) / b  # trace(X X^T) = trace(X^T X)
    solved = _spd_solve_right(rows.mT, kernel, b * lam)  # X^T K^-1, (g, n, b)
    return (b * (solved @ _grad_rows(grad_z, geo, 0, x.shape[0], dtype)).mT).reshape(shape), trace


def _conv_input_grad(grad_z: Tensor, x: Tensor, w: Tensor, geo: _Geometry) -> Tensor:
    """The ordinary input gradient of a convolution, from the framework's own kernel."""
    extra = [hi - lo for lo, hi in geo.pads]  # 'same' with an even kernel pads one more on the right
    if any(extra):
        x = F.pad(x, [p for e in reversed(extra) for p in (0, e)])
    dims = len(geo.kernel)
    gx, _, _ = torch.ops.aten.convolution_backward(
        grad_z, x, w, None, list(geo.stride), [lo for lo, _ in geo.pads], list(geo.dilation), False, [0] * dims,
        geo.groups, [True, False, False])
    if any(extra):
        gx = gx[(Ellipsis, *(slice(0, size - e) for size, e in zip(gx.shape[2:], extra)))]
    return gx


@contextlib.contextmanager
def _full_float32():
    """Full float32 for TrAct's own products, whatever the matmul precision (train.py, like timm, lets float32 matmuls
    use TF32 on Ampere+ GPUs): with TF32's 10-bit mantissa the Gram's rounding would be far above lambda's 0.1 and the
    Cholesky solve would no longer be TrAct's."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _solve_dtype(x_dtype: torch.dtype, lam: float, layer: int) -> Optional[torch.dtype]:
    """The dtype of the layer's products and solve: float64 where float32 cannot resolve ``lam`` (None: not known
    before the layer's first Gram)."""
    if x_dtype == torch.float64:
        return torch.float64
    module = _LAYERS.get(layer)
    scale = module._gram_scale if module is not None else None
    if scale is None:
        return None
    return torch.float32 if _float32_resolves(scale, lam) else torch.float64


def _float32_resolves(scale: float, lam: float) -> bool:
    """Whether float32's rounding of a Gram with trace ``scale`` is negligible next to ``lam``."""
    return torch.finfo(torch.float32).eps * scale / lam <= _FLOAT32_MAX_ROUNDING


def _weight_grad_impl(grad_z: Tensor, x: Tensor, shape: List[int], kernel: List[int], stride: List[int],
                      pads: List[int], dilation: List[int], groups: int, lam: float, woodbury: bool, sync: bool,
                      layer: int) -> Tensor:
    """TrAct's weight gradient from the saved input and grad_z, both upcast to float32 at least (float64 where
    float32 cannot resolve lam: see the module's docstring).

    An operator of its own, so that torch.compile calls it as one opaque kernel: inside, autocast is off and the
    matmul precision is "highest" whatever the compiled graph around it was traced with (dynamo can neither trace an
    autocast change in a backward nor keep a precision change), and eager and compiled runs compute the same thing,
    the one host read at a layer's first backward included. The ordinary weight gradient grad_z^T X is computed here
    too, never taken from the framework's kernel in the layer's compute dtype: its bf16/fp16 (or TF32) rounding
    would be amplified by the solve.
    """
    geo = _Geometry(tuple(kernel), tuple(stride), None, tuple(zip(pads[::2], pads[1::2])), tuple(dilation),
                    groups) if kernel else None
    size = torch.Size(shape)

    def solve(dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        return (_woodbury_tract(grad_z, x, geo, lam, size, dtype) if woodbury else
                _gram_tract(grad_z, x, geo, lam, size, sync, dtype))

    dtype = _solve_dtype(x.dtype, lam, layer)
    with torch.autocast(x.device.type, enabled=False), _full_float32():
        out, trace = solve(dtype or torch.float32)
        if dtype is None:
            # The layer's first Gram: its scale, read once, decides this and every later backward. With sync the
            # Gram is the all-reduced one, so every process decides alike. An all-zero or non-finite batch decides
            # nothing and the next one is asked.
            scale = trace.item()
            module = _LAYERS.get(layer)
            if module is not None and math.isfinite(scale) and scale > 0:
                module._gram_scale = scale
            if math.isfinite(scale) and not _float32_resolves(scale, lam):
                out, _ = solve(torch.float64)
    return out.to(torch.promote_types(x.dtype, torch.float32)).contiguous()  # what the fake kernel promises


_weight_grad = torch.library.custom_op("tract::weight_grad", _weight_grad_impl, mutates_args=())


@_weight_grad.register_fake
def _(grad_z, x, shape, kernel, stride, pads, dilation, groups, lam, woodbury, sync, layer):
    return x.new_empty(shape, dtype=torch.promote_types(x.dtype, torch.float32))


class _TrActFunction(torch.autograd.Function):
    """The layer's own functional forward; backward with the TrAct weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], geo: Optional[_Geometry], lam: float,
                sync_gram: bool, layer: int) -> Tensor:
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.geo, ctx.lam, ctx.sync_gram, ctx.has_bias, ctx.layer = geo, lam, sync_gram, bias is not None, layer
        device_type = x.device.type
        amp_dtype = _autocast_dtype(device_type)
        if amp_dtype is not None:
            # Cast as autocast would and save the cast tensors, which is what the plain layer's autograd saves too.
            x, weight, bias = (t.to(amp_dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                               else t for t in (x, weight, bias))
        with torch.autocast(device_type, enabled=False):
            z = F.linear(x, weight, bias) if geo is None else _CONV_FN[len(geo.kernel)](
                x, weight, bias, geo.stride, geo.padding, geo.dilation, geo.groups)
        ctx.save_for_backward(x, weight)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z: Tensor):
        x, weight = ctx.saved_tensors
        geo = ctx.geo
        if geo is None:
            x = x.reshape(-1, x.shape[-1])
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        sync = ctx.sync_gram and _world_size() > 1
        # No autocast switch here (dynamo cannot trace one in a backward): grad_z and the saved x and weight already
        # have the layer's compute dtype, so autocast would cast nothing below; the weight gradient turns it off inside.
        gx = gb = gw = None
        if geo is None:
            gx = grad_z @ weight if need_x else None
            gb = grad_z.reshape(-1, grad_z.shape[-1]).sum(0) if need_b else None
        else:
            gx = _conv_input_grad(grad_z, x, weight, geo) if need_x else None
            if need_b:
                # Per item, then over items: fast for NCHW, channels-last and sliced (class-token) layouts alike,
                # where one reduction over all but dim 1 is about 15x slower on the strided ones. Accumulated in
                # float32 and rounded once, as the framework's bias gradient is.
                acc = torch.promote_types(grad_z.dtype, torch.float32)
                gb = grad_z.movedim(1, -1).flatten(1, -2).sum(1, dtype=acc).sum(0).to(grad_z.dtype)
        if need_w:
            # b < n: solve in the (b, b) row space, straight from grad_z.
            woodbury = not sync and x.shape[0] * _rows_per_item(x, geo) < weight[0].numel()
            gw = _weight_grad(
                grad_z if geo is not None else grad_z.reshape(-1, grad_z.shape[-1]), x, list(weight.shape),
                list(geo.kernel) if geo else [], list(geo.stride) if geo else [],
                [p for pair in geo.pads for p in pair] if geo else [], list(geo.dilation) if geo else [],
                geo.groups if geo else 1, ctx.lam, woodbury, sync, ctx.layer)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        return (gx.to(x_dtype) if gx is not None else None, gw.to(w_dtype) if gw is not None else None,
                gb.to(b_dtype) if gb is not None else None, None, None, None, None)


class TrAct(nn.Module):
    """A Linear/Conv layer whose weight gradient is TrAct's: grad_z^T X (X^T X / b + lam I)^-1.

    ``TrAct(layer, lam)`` returns a module of a subclass of ``type(layer)`` that holds the SAME Parameter objects
    under the same names (state_dict keys unchanged, optimizers built before wrapping keep working) and every
    attribute of the layer; ``isinstance(m, TrAct)`` and ``isinstance(m, type(layer))`` are both true.

    The gradient is exact at ``lam``: computed in float32 where float32 resolves lam next to the Gram's scale, else
    in float64, as decided from the Gram of the layer's first backward (one host read, then none). A copy keeps
    the decision; a new ``lam`` is judged against the same scale without a read.

    Args:
        layer: nn.Linear (any leading dims) or nn.Conv1d/2d/3d (any stride, padding, dilation, groups, padding_mode).
        lam: lambda, the only hyperparameter: 0.1 recommended, 0.2 for long runs, 0.05 more aggressive.
        sync_gram: all-reduce the Gram over torch.distributed processes (the Gram of all processes' rows);
            by default each process uses its own batch's Gram, as in the paper.
    """

    _tract_base: type = nn.Module

    def __new__(cls, layer: nn.Module = None, lam: float = 0.1, *, sync_gram: bool = False):
        if cls is TrAct:
            if isinstance(layer, TrAct):
                raise ValueError("layer is already a TrAct layer: call remove_tract(model) before wrapping it again")
            base = _supported_base(layer)
            if base is None:
                raise TypeError(f"TrAct supports {_SUPPORTED_NAMES}, got {type(layer).__name__}")
            cls = _tract_class(type(layer))
        return super().__new__(cls)

    def __init__(self, layer: nn.Module, lam: float = 0.1, *, sync_gram: bool = False) -> None:
        lam = _check_lam(lam)
        # Share the Parameters/buffers/hooks but not the containers, so this module and ``layer`` stay independent.
        object.__setattr__(self, "__dict__", _copy_module_dict(layer.__dict__))
        self.lam = lam
        self.sync_gram = bool(sync_gram)
        self._gram_scale: Optional[float] = None  # trace(X^T X / b) of the first backward: decides the dtype
        self._register()

    def _register(self) -> None:
        self._layer_id = next(_LAYER_IDS)
        _LAYERS[self._layer_id] = self

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_gram_scale", None)  # pickled before the scale existed
        self._register()  # a copy is a layer of its own (it keeps the decided dtype: same data, same scale)

    @property
    def lam(self) -> float:
        """TrAct's lambda (validated: finite and > 0)."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = _check_lam(value)

    def forward(self, x: Tensor) -> Tensor:
        """Same output as the wrapped layer; TrAct weight gradient when one is computed."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        if isinstance(self, nn.Linear):
            geo = None
        else:
            dims = len(self.kernel_size)
            pairs = self._reversed_padding_repeated_twice
            pads = tuple((pairs[2 * i], pairs[2 * i + 1]) for i in reversed(range(dims)))
            padding = self.padding
            if self.padding_mode != "zeros":  # the layer's own two-op path: pad, then convolve without padding
                x = F.pad(x, pairs, mode=self.padding_mode)
                padding, pads = (0,) * dims, ((0, 0),) * dims
            geo = _Geometry(tuple(self.kernel_size), tuple(self.stride), padding, pads, tuple(self.dilation),
                            self.groups)
        return _TrActFunction.apply(x, self.weight, self.bias, geo, self.lam, self.sync_gram, self._layer_id)

    def extra_repr(self) -> str:
        """The wrapped layer's description plus lam (and sync_gram when set)."""
        return super().extra_repr() + f", lam={self.lam}" + (", sync_gram=True" if self.sync_gram else "")

    def __reduce_ex__(self, protocol):
        # The class is made at run time: rebuild it from the (importable) wrapped class when unpickling/deep-copying.
        return _new_tract, (self._tract_base,), self.__dict__

    def plain(self) -> nn.Module:
        """A plain ``type(layer)`` module holding the same Parameters (what TrAct wrapped)."""
        layer = self._tract_base.__new__(self._tract_base)
        state = _copy_module_dict(self.__dict__)
        for key in ("_lam", "sync_gram", "_gram_scale", "_layer_id"):
            state.pop(key)
        object.__setattr__(layer, "__dict__", state)
        return layer


_CLASSES: dict = {}


def _tract_class(base: type) -> type:
    """The TrAct subclass of ``base`` (one per wrapped class)."""
    if base not in _CLASSES:
        name = f"TrAct{base.__name__}"
        _CLASSES[base] = type(name, (TrAct, base), {"__module__": __name__, "__qualname__": name, "_tract_base": base,
                                                    "__doc__": f"{base.__name__} trained with TrAct."})
    return _CLASSES[base]


def _new_tract(base: type) -> TrAct:
    cls = _tract_class(base)
    return nn.Module.__new__(cls)


def _copy_module_dict(state: dict) -> dict:
    return {k: (type(v)(v) if isinstance(v, (dict, set)) else v) for k, v in state.items()}


def _split_name(model: nn.Module, name: str) -> Tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) for dotted ``name`` in ``model``."""
    if not name:
        raise ValueError("the layer name is empty: pass layer='dotted.name' of a submodule")
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        module = parent.get_submodule(attr)
    except AttributeError:
        raise ValueError(f"model has no submodule '{name}': pass layer='dotted.name' of an existing layer") from None
    return parent, attr, module


def find_first_layer(model: nn.Module) -> str:
    """Dotted name of the first layer: ViT patch embedding, timm's first_conv, or an unambiguous first layer.

    A hybrid ViT's ``patch_embed.proj`` projects the output of a convolutional backbone (timm's HybridEmbed): its
    first layer is the backbone's stem, named by ``first_conv``.
    """
    patch_embed = getattr(model, "patch_embed", None)
    proj = getattr(patch_embed, "proj", None)
    hybrid = isinstance(getattr(patch_embed, "backbone", None), nn.Module)
    if isinstance(proj, nn.Module) and _supported_base(proj) is not None and not hybrid:
        return "patch_embed.proj"
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    first = cfg.get("first_conv") if isinstance(cfg, dict) else None
    if isinstance(first, (list, tuple)) and len(first) == 1:
        first = first[0]
    if isinstance(first, str):
        try:
            layer = model.get_submodule(first)
        except AttributeError:
            layer = None
        if layer is not None and _supported_base(layer) is not None:
            return first
        kind = type(layer).__name__ if layer is not None else "missing"
        raise ValueError(f"the first layer, pretrained_cfg['first_conv'] = '{first}', is {kind}, which TrAct does not "
                         f"support (it supports {_SUPPORTED_NAMES}): pass layer='dotted.name' to wrap another layer")
    candidates = [name for name, m in model.named_modules() if _supported_base(m) is not None]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        # Module order is execution order only through nn.Sequential containers.
        parts = candidates[0].split(".")
        if all(isinstance(model.get_submodule(".".join(parts[:i])), nn.Sequential) for i in range(len(parts))):
            return candidates[0]
    shown = ", ".join(candidates[:4]) + (", ..." if len(candidates) > 4 else "")
    raise ValueError(f"cannot tell the first layer of {type(model).__name__} from its modules "
                     f"(candidates: {shown or 'none'}): pass layer='dotted.name'")


def apply_tract(model: nn.Module, lam: float = 0.1, layer: Optional[str] = None, *, sync_gram: bool = False) -> str:
    """Wrap the first layer of ``model`` (or ``layer``, a dotted name) with TrAct in place; return the name wrapped.

    Refuses (ValueError) a model that already has a TrAct layer: call ``remove_tract(model)`` first. Apply it
    before wrapping the model in DDP/Accelerate; the Parameters are unchanged, so it may come before or after
    building the optimizer and loading a state_dict.
    """
    lam = _check_lam(lam)
    wrapped = [name for name, m in model.named_modules() if isinstance(m, TrAct)]
    if wrapped:
        raise ValueError(f"model already has a TrAct layer ('{wrapped[0] or type(model).__name__}'): "
                         "call remove_tract(model) before applying TrAct again")
    name = layer if layer is not None else find_first_layer(model)
    parent, attr, module = _split_name(model, name)
    setattr(parent, attr, TrAct(module, lam, sync_gram=sync_gram))
    return name


def remove_tract(model: nn.Module) -> nn.Module:
    """Put the plain layers back in place of every TrAct layer (same Parameters); return the model.

    If ``model`` itself is a TrAct layer, the plain layer is returned.
    """
    if isinstance(model, TrAct):
        return model.plain()
    for name, module in list(model.named_modules()):
        if isinstance(module, TrAct):
            parent, attr, _ = _split_name(model, name)
            setattr(parent, attr, module.plain())
    return model
