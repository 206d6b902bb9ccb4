"""How much time TrAct adds to a training step, next to a naive implementation and the arithmetic floor.

Per model it measures, interleaved in one process (medians over --reps repetitions):
  step      vanilla training step of the whole model (forward + backward + AdamW step), ms
  extra     first-layer forward+backward with TrAct minus without (median of paired differences), ms
  ratio     1 + extra / step: the training-time factor TrAct costs
  naive     the same extra for the paper's Figure 2 written out (explicit unfold + torch.linalg.inv)
  floor     Gram + Cholesky + solve alone for that layer's (b, n, m), on ready-made rows

Run from the repository root, e.g.:
  .venv/bin/python benchmarks/overhead.py                              # all models, CPU unless CUDA is there
  .venv/bin/python benchmarks/overhead.py --models vit_s16_224 cifar_vit --reps 50
  .venv/bin/python benchmarks/overhead.py --device cuda --amp bf16 --reps 200
  .venv/bin/python benchmarks/overhead.py --inputs pixels       # raw [0, 255] images: TrAct's float64 solve
Prints a Markdown table. Needs timm (models are created with pretrained=False, nothing is downloaded).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere in the checkout
from tract import TrAct, find_first_layer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _resnet18_cifar() -> nn.Module:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)  # the CIFAR stem: 3x3/1, no max-pool
    model.maxpool = nn.Identity()
    return model


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, **kwargs)
    return make


# name -> (builder, batch, image size, classes)
MODELS: Dict[str, tuple] = {
    "vit_s16_224": (_timm("deit3_small_patch16_224", num_classes=1000), 8, 224, 1000),
    "vit_b16_192": (_timm("deit3_base_patch16_224", img_size=192, num_classes=1000), 4, 192, 1000),
    "cifar_vit": (_timm("vit_small_patch16_224", img_size=32, patch_size=4, depth=7, embed_dim=384, num_heads=12,
                        num_classes=10), 64, 32, 10),
    "resnet18_cifar": (_resnet18_cifar, 64, 32, 10),
}


class _NaiveTrActConv2d(torch.autograd.Function):
    """The paper's Figure 2 as written, for a Conv2d: unfold the input, multiply by an explicit inverse."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv: nn.Conv2d, lam: float):
        ctx.save_for_backward(x, weight)
        ctx.conv, ctx.lam, ctx.has_bias = conv, lam, bias is not None
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_z):
        x, weight = ctx.saved_tensors
        conv = ctx.conv
        rows = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)
        rows = rows.reshape(-1, rows.shape[-1]).float()
        gz = grad_z.permute(0, 2, 3, 1).reshape(-1, grad_z.shape[1]).float()
        b, n = rows.shape
        grad_w = gz.T @ rows @ torch.linalg.inv(rows.T @ rows / b + ctx.lam * torch.eye(n, device=rows.device))
        grad_b = gz.sum(0).to(weight.dtype) if ctx.has_bias else None
        return None, grad_w.reshape(weight.shape).to(weight.dtype), grad_b, None, None


class _Naive(nn.Module):
    def __init__(self, conv: nn.Conv2d, lam: float):
        super().__init__()
        self.conv, self.lam = conv, lam

    def forward(self, x):
        return _NaiveTrActConv2d.apply(x, self.conv.weight, self.conv.bias, self.conv, self.lam)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _floor_fn(rows: torch.Tensor, grad_w: torch.Tensor, lam: float) -> Callable[[], None]:
    def run() -> None:
        gram = rows.T @ rows / rows.shape[0]
        gram.diagonal().add_(lam)
        torch.cholesky_solve(grad_w.T, torch.linalg.cholesky_ex(gram).L)  # timed only: a failure must not stop it
    return run


def measure(name: str, args: argparse.Namespace, device: torch.device) -> Dict[str, float]:
    """Median timings (seconds) for one model."""
    builder, batch, size, classes = MODELS[name]
    batch = args.batch_size or batch
    dtype = DTYPES[args.dtype]
    amp = AMP[args.amp]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    torch.manual_seed(0)
    model = builder().to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = (torch.randn(batch, 3, size, size, device=device, dtype=dtype) if args.inputs == "standardised" else
              torch.randint(0, 256, (batch, 3, size, size), device=device).to(dtype))
    labels = torch.randint(0, classes, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    first = model.get_submodule(find_first_layer(model))
    layers = {"plain": copy.deepcopy(first), "tract": TrAct(copy.deepcopy(first), args.lam),
              "naive": _Naive(copy.deepcopy(first), args.lam)}
    # The first layer's output gradient as the model really delivers it (a ViT's is channels-last: flatten+transpose).
    captured: List[torch.Tensor] = []

    def capture(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        out.register_hook(captured.append)

    hook = first.register_forward_hook(capture)
    step()
    hook.remove()
    grad_z = captured[0].detach()

    def first_layer(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with autocast():
                out = layer(images)
            out.backward(grad_z)
        return run

    rows = F.unfold(images.float(), first.kernel_size, first.dilation, first.padding, first.stride).transpose(1, 2)
    rows = rows.reshape(-1, rows.shape[-1]).contiguous()
    floor = _floor_fn(rows, torch.randn(first.out_channels, rows.shape[1], device=device), args.lam)

    runs = {"step": step, **{k: first_layer(v) for k, v in layers.items()}, "floor": floor}
    times: Dict[str, List[float]] = {k: [] for k in runs}
    for rep in range(args.warmup + args.reps):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))  # alternate to cancel drift and cache order
        for key in order:
            elapsed = _timed(runs[key], device)
            if rep >= args.warmup:
                times[key].append(elapsed)
    paired = lambda key: statistics.median(t - p for t, p in zip(times[key], times["plain"]))  # noqa: E731
    return {"step": statistics.median(times["step"]), "extra": paired("tract"), "naive": paired("naive"),
            "floor": statistics.median(times["floor"]), "b": rows.shape[0], "n": rows.shape[1],
            "m": first.out_channels, "batch": batch}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to time")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per model (30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repetitions first (3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (cuda when available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="parameter and input dtype (float32)")
    parser.add_argument("--amp", default="none", choices=list(AMP), help="autocast dtype (none)")
    parser.add_argument("--lam", type=float, default=0.1, help="TrAct's lambda (0.1)")
    parser.add_argument("--inputs", default="standardised", choices=["standardised", "pixels"],
                        help="images drawn standardised (randn) or as raw pixel values in [0, 255] (standardised)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch's default)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (each model's own by default)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads), dtype {args.dtype}, amp {args.amp}, lam {args.lam}, "
          f"inputs {args.inputs}, reps {args.reps}, torch {torch.__version__}\n")
    print("| model | batch | b x n -> m | step ms | TrAct extra ms | ratio | naive extra ms | naive ratio "
          "| floor ms | floor ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = measure(name, args, device)
        ms = lambda s: f"{1e3 * s:.2f}"  # noqa: E731
        ratio = lambda s: f"{1 + s / r['step']:.4f}"  # noqa: E731
        print(f"| {name} | {r['batch']} | {r['b']} x {r['n']} -> {r['m']} | {ms(r['step'])} | {ms(r['extra'])} "
              f"| {ratio(r['extra'])} | {ms(r['naive'])} | {ratio(r['naive'])} | {ms(r['floor'])} "
              f"| {ratio(r['floor'])} |", flush=True)


if __name__ == "__main__":
    main()
