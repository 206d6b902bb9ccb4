"""train.py's training throughput against a bare PyTorch loop doing the same work, with each speed switch on and off.

Both runners train the same model on the same images with the same loader settings, optimizer (timm's AdamW),
loss (label smoothing 0.1) and precision, for 2 epochs of --updates optimizer updates, each in a fresh process.
The bare loop is ``for x, y in loader: loss(model(x), y).backward(); opt.step(); opt.zero_grad()`` on a plain
DataLoader (timm's PrefetchLoader on CUDA, as train.py): the framework's ceiling on this machine. Per run:

  img/s       steady state: images over the wall time of the updates after the first --warmup of each epoch
  first step  seconds from the process start to the end of the first update (imports, data, model, compile)
  epoch gap   seconds from the last update of epoch 0 to the first update of epoch 1 ended, minus one update:
              loader start-up (persistent workers) and, for train.py, its end-of-epoch checkpoint
  peak MB     peak resident memory of the training process (CPU) or peak CUDA memory allocated (GPU)

Variants (one switch changed from ``base``): compile (--torchcompile, inductor), channels-last, no persistent
workers, TrAct, and on the CPU the GPU input path (--prefetcher: uint8 from the workers, normalised in the loop).
Runs are interleaved (every variant and runner once per repetition); the table gives medians over --reps and the
ratios train.py / bare and variant / base.

    .venv/bin/python benchmarks/throughput.py --threads 1            # CPU, a few minutes per repetition
    .venv/bin/python benchmarks/throughput.py --device cuda --amp bf16 --batch-size 256 --model-kwargs ...
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"base": [], "compile": ["--torchcompile"], "channels-last": ["--channels-last"],
            "no persistent workers": ["--no-persistent-workers"], "TrAct": ["--tract"],
            "compile + TrAct": ["--torchcompile", "--tract"], "prefetcher on CPU": ["--prefetcher"]}


def write_images(root: Path, per_class: int, size: int) -> None:
    """A 4-class ImageFolder of random-noise JPEGs (decoding and augmentation cost like real photos)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 4)):
        for c in range(4):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def train_args(opts, data: Path, out: Path, switches) -> list:
    return ["--data-set", "FOLDER", "--data-path", str(data), "--model", opts.model, "--model-kwargs",
            *opts.model_kwargs, "--input-size", str(opts.input_size), "--batch-size", str(opts.batch_size),
            "--epochs", "2", "--max-updates-per-epoch", str(opts.updates), "--val-interval", "2",
            "--num-workers", str(opts.workers), "--opt", "adamw", "--smoothing", "0.1", "--no-progress",
            "--output-dir", str(out), *(["--mixed-precision", opts.amp] if opts.amp != "no" else []), *switches]


class Stamped:
    """Wraps a loader: the time of every batch request (one per update; the loop asks once more at the end)."""

    def __init__(self, loader, stamps: list):
        self.loader, self.stamps = loader, stamps

    def __iter__(self):
        for batch in self.loader:
            self.stamps.append(time.perf_counter())
            yield batch
        self.stamps.append(time.perf_counter())

    def __len__(self):
        return len(self.loader)


def run_train(opts, data: Path, switches) -> list:
    """train.py itself, its loop's batch requests time-stamped."""
    sys.path.insert(0, str(REPO))
    import train

    epochs, original = [], train.train_one_epoch

    def stamped(model, loader, *args, **kwargs):
        epochs.append([])
        return original(model, Stamped(loader, epochs[-1]), *args, **kwargs)

    train.train_one_epoch = stamped
    with tempfile.TemporaryDirectory() as out:
        train.main(train_args(opts, data, Path(out) / "run", switches))
    return epochs


def run_bare(opts, data: Path, switches) -> list:
    """The same work in plain PyTorch + timm: no Accelerate, scheduler, checkpoints or logging."""
    sys.path.insert(0, str(REPO))
    import torch
    from timm.data.loader import PrefetchLoader, fast_collate
    from timm.optim import create_optimizer_v2

    from tract.config import parse_args
    from tract.data import build_dataset, build_transform, default_mean_std
    from tract.models import build_model

    args = parse_args(train_args(opts, data, Path("unused"), switches))
    device = torch.device(opts.device)
    mean, std = default_mean_std(3)
    on_gpu = device.type == "cuda"
    prefetch = args.prefetcher if args.prefetcher is not None else on_gpu
    transform = build_transform(True, args.input_size, simple_random_crop=args.src, color_jitter=args.color_jitter,
                                mean=mean, std=std, use_prefetcher=prefetch)
    dataset, classes = build_dataset("FOLDER", str(data), True, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers, pin_memory=on_gpu,
                                         persistent_workers=args.persistent_workers and args.num_workers > 0,
                                         collate_fn=fast_collate if prefetch else None)
    if prefetch:
        loader = PrefetchLoader(loader, mean=mean, std=std, device=device)
    model, _ = build_model(args, classes, log=lambda _: None)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    model.to(device)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=args.lr * args.batch_size / 512,
                                    weight_decay=args.weight_decay)
    if args.torchcompile:
        model.compile(backend=args.torchcompile)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    epochs = []
    model.train()
    for _ in range(2):
        epochs.append([])
        for step, (x, y) in enumerate(Stamped(loader, epochs[-1])):
            if step == args.max_updates_per_epoch:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = criterion(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return epochs


def child(opts) -> None:
    """One measured run in this process; prints one JSON line."""
    import torch

    data = Path(opts.data)
    switches = [a for switch in VARIANTS[opts.variant]
                for a in ([switch, opts.compile_backend] if switch == "--torchcompile" else [switch])]
    epochs = (run_train if opts.runner == "train.py" else run_bare)(opts, data, switches)
    if opts.device == "cuda":
        torch.cuda.synchronize()
    steps = [[b - a for a, b in zip(e, e[1:])][:opts.updates] for e in epochs]
    steady = [t for e in steps for t in e[opts.warmup:]]
    step = statistics.median(steady)
    result = {
        "img_s": opts.batch_size * len(steady) / sum(steady),
        "first_step": epochs[0][1] - START,
        "epoch_gap": epochs[1][1] - epochs[0][opts.updates] - step,
        "peak_mb": (torch.cuda.max_memory_allocated() / 2 ** 20 if opts.device == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--amp", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--model-kwargs", nargs="*", default=["patch_size=4", "embed_dim=96", "depth=4", "num_heads=3"])
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--updates", type=int, default=10, help="optimizer updates per epoch")
    p.add_argument("--warmup", type=int, default=2, help="updates of each epoch left out of the steady state")
    p.add_argument("--workers", type=int, default=1, help="loader workers")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (OMP_NUM_THREADS); None = torch's default. On a shared CPU, 1: "
                        "threads that wait for a busy core make steps several times slower and erratic")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS)[:-1], choices=list(VARIANTS))
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile variants (inductor; aot_eager skips code generation)")
    p.add_argument("--runner", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.runner:
        child(opts)
        return

    env = dict(os.environ)
    if opts.device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    results = {(v, r): [] for v in opts.variants for r in ("train.py", "bare")}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_images(data, per_class=(opts.updates + 1) * opts.batch_size // 4 + 1, size=opts.input_size + 8)
        argv = [a for a in sys.argv[1:]]
        for rep in range(opts.reps):
            for variant in opts.variants:
                for runner in ("train.py", "bare"):
                    cmd = [sys.executable, __file__, *argv, "--runner", runner, "--variant", variant,
                           "--data", str(data)]
                    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
                    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        sys.exit(f"{runner} {variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
                    results[(variant, runner)].append(json.loads(line[7:]))
                    print(f"rep {rep} {variant:22s} {runner:8s} {results[(variant, runner)][-1]}", file=sys.stderr,
                          flush=True)

    def med(variant, runner, key):
        return statistics.median(r[key] for r in results[(variant, runner)])

    import torch

    print(f"\n{opts.reps} interleaved repetitions, medians; torch {torch.__version__}, device {opts.device}, "
          f"precision {opts.amp}, {opts.model} {' '.join(opts.model_kwargs)} at {opts.input_size} px, batch "
          f"{opts.batch_size}, {opts.workers} loader worker(s), {opts.threads or 'default'} torch thread(s), "
          f"2 epochs of {opts.updates} updates, compile backend {opts.compile_backend}\n")
    print("| variant | train.py img/s | bare img/s | train.py / bare | vs base (train.py) | first step train.py / "
          "bare (s) | epoch gap train.py / bare (s) | peak MB train.py / bare |")
    print("|---|---|---|---|---|---|---|---|")
    base = med(opts.variants[0], "train.py", "img_s")
    for v in opts.variants:
        t, b = med(v, "train.py", "img_s"), med(v, "bare", "img_s")
        print(f"| {v} | {t:.0f} | {b:.0f} | {t / b:.3f} | {t / base:.3f} | "
              f"{med(v, 'train.py', 'first_step'):.1f} / {med(v, 'bare', 'first_step'):.1f} | "
              f"{med(v, 'train.py', 'epoch_gap'):.2f} / {med(v, 'bare', 'epoch_gap'):.2f} | "
              f"{med(v, 'train.py', 'peak_mb'):.0f} / {med(v, 'bare', 'peak_mb'):.0f} |")


if __name__ == "__main__":
    main()
