"""The loop: ``train_one_epoch`` and ``evaluate`` (DeiT's engine.py, on Accelerate).

The learning rate is a function of where training stands (epoch and optimizer update), set before every update from
the timm scheduler: per epoch by default (as DeiT III), per update with ``--sched-on-updates``. A resumed run
therefore sees exactly the lr sequence of an uninterrupted one (DeiT's resume runs one epoch ahead on the schedule).
"""
import math
import time
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tract.checkpoint import TrainState

__all__ = ["OPTIMIZER_ALIASES", "TORCH_FUSED", "build_optimizer", "describe_optimizer", "build_scheduler",
           "build_criterion", "build_mixup", "mixup_active", "train_one_epoch", "evaluate"]

# DeiT's apex optimizers -> timm's names. timm's lamb clips the global gradient norm at max_grad_norm=1.0 before its
# update, as apex FusedLAMB does (timm/optim/lamb.py: _get_clip_grad_norm).
OPTIMIZER_ALIASES = {"fusedlamb": "lamb", "fusedadam": "adam", "fusedadamw": "adamw", "fusedsgd": "sgd",
                     "fusednovograd": "novograd"}
# The aliases whose timm optimizer is torch's, which has a fused kernel (torch.optim: fused=True). timm's lamb and
# novograd have none: their fused* names run timm's single-tensor loops.
TORCH_FUSED = ("adam", "adamw", "sgd")


def build_optimizer(args, model: nn.Module, lr: float, device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """timm's create_optimizer_v2 (no weight decay on 1-D params, biases, pos_embed, cls_token) at ``lr``.

    A ``fused*`` name whose timm optimizer is torch's gets ``fused=True`` where torch has the kernel for ``device``
    (CUDA, and the CPU: measured 2.2x faster than the for-loop there), else ``foreach=True``. ``--opt-kwargs`` go to
    the optimizer last and win.
    """
    from timm.optim import create_optimizer_v2, list_optimizers

    from tract.config import ConfigError

    name = OPTIMIZER_ALIASES.get(args.opt.lower(), args.opt.lower())
    known = list_optimizers()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known + list(OPTIMIZER_ALIASES), n=3)
        raise ConfigError(f"unknown optimizer '{args.opt}'" + (f"; closest: {', '.join(close)}" if close else "") +
                          " (timm.optim.list_optimizers() lists them)")
    from tract.models import optimizer_eps

    kwargs = {}
    eps = optimizer_eps(args)  # DeiT's 1e-8 for DeiT III models, as DeiT's main.py passes it
    if eps is not None:
        kwargs["eps"] = eps
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    if args.opt.lower() in OPTIMIZER_ALIASES and name in TORCH_FUSED:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        device_type = (device or torch.device("cpu")).type
        kwargs.update({"fused": True} if device_type in _get_fused_kernels_supported_devices() else {"foreach": True})
    kwargs.update(args.opt_kwargs)
    try:
        return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                                   **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--opt {args.opt} refused its arguments {kwargs}: {e}; check --opt-kwargs") from None


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """Which implementation steps: the class and, for torch's optimizers, fused / foreach / for-loop."""
    cls = type(optimizer)
    defaults = optimizer.defaults
    if defaults.get("fused"):
        how = "fused kernel"
    elif defaults.get("foreach"):
        how = "foreach (multi-tensor)"
    elif cls.__module__.startswith("timm"):
        how = "timm's single-tensor loop (timm has no fused version)"
    elif "foreach" in defaults and defaults["foreach"] is None:
        how = "torch's default: foreach on CUDA, for-loop elsewhere"
    else:
        how = "for-loop"
    return f"{cls.__module__}.{cls.__name__}, {how}"


def build_scheduler(args, optimizer, updates_per_epoch: int):
    """timm's create_scheduler_v2, stepped per epoch (DeiT) or per update (``--sched-on-updates``)."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                       decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
                                       min_lr=args.min_lr, warmup_lr=args.warmup_lr,
                                       warmup_epochs=args.warmup_epochs, step_on_epochs=not args.sched_on_updates,
                                       updates_per_epoch=updates_per_epoch)
    return scheduler


def build_criterion(args, num_classes: int) -> nn.Module:
    """The training loss for ``args``: DeiT's choice among BCE, soft-target CE, label-smoothing CE and CE."""
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if args.bce_loss:
        # DeiT III: targets.gt(0.0) after mixup, then BCEWithLogits (mean); smoothing is 0 (validated).
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)
    if mixup_active(args):
        return SoftTargetCrossEntropy()  # mixup already smoothed the targets
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def mixup_active(args) -> bool:
    """Whether mixup/cutmix runs at all (DeiT's mixup_active)."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def build_mixup(args, num_classes: int) -> Optional[Callable]:
    """timm's Mixup/CutMix with DeiT's settings, or None when both are off."""
    if not mixup_active(args):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=num_classes)


def _progress(total: int, initial: int, desc: str, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    enabled = enabled and sys.stderr.isatty()  # a log file gets the per-epoch lines, not bar redraws
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer, scheduler, criterion: nn.Module, accelerator,
                    state: TrainState, updates_per_epoch: int, *, mixup_fn: Optional[Callable] = None, ema=None,
                    clip_grad: Optional[float] = None, should_stop: Optional[Callable[[], bool]] = None,
                    after_update: Optional[Callable[[], None]] = None, channels_last: bool = False,
                    sync_interval: int = 20, progress: bool = True) -> Dict[str, float]:
    """Train from ``state.update_in_epoch`` to the end of epoch ``state.epoch``; advance ``state`` as it goes.

    ``loader`` yields this process's micro-batches from the current position on (on the device already, or moved
    here). ``should_stop`` is asked after every update but the last of the epoch, then ``after_update`` is called.
    The loop reads the device only every ``sync_interval`` updates (loss check, progress). Returns train_loss,
    train_lr, images_per_sec, epoch_time and ``preempted`` (1.0 when ``should_stop`` ended the epoch early).
    """
    model.train()
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)
    scheduler.step(state.epoch)  # per-epoch schedules: lr(epoch); per-update ones ignore this call
    scheduler.step_update(state.num_updates)  # per-update schedules: lr(update); per-epoch ones ignore it
    loss_sum = torch.zeros((), device=device)
    micro_batches, images, preempted, lr = 0, 0, False, optimizer.param_groups[0]["lr"]
    bar = _progress(updates_per_epoch, state.update_in_epoch, f"epoch {state.epoch}",
                    progress and accelerator.is_main_process)
    start = time.perf_counter()
    for samples, targets in loader:
        if state.update_in_epoch >= updates_per_epoch:
            break
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            samples = samples.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with accelerator.accumulate(model):  # skips the DDP all-reduce on all but the last micro-batch
            loss = criterion(model(samples), targets)
            accelerator.backward(loss)  # divides by the accumulation steps
            if clip_grad is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()  # Accelerate's wrapper steps only when the gradients are complete
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        micro_batches += 1
        images += samples.shape[0]
        if not accelerator.sync_gradients:
            continue

        lr = optimizer.param_groups[0]["lr"]
        state.num_updates += 1
        state.update_in_epoch += 1
        scheduler.step_update(state.num_updates)
        if ema is not None:
            ema.update(unwrapped, step=state.num_updates)
        bar.update()
        if state.update_in_epoch % sync_interval == 0 or state.update_in_epoch == updates_per_epoch:
            # Summed over processes, so that all of them stop together on a non-finite loss; a host sync, and a
            # collective when distributed: only every few updates.
            mean_loss = accelerator.reduce(loss_sum.reshape(1), reduction="sum").item() / (
                micro_batches * accelerator.num_processes)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} at update {state.num_updates}: training diverged "
                                         "(lower --lr, or check the data)")
            rate = images * accelerator.num_processes / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}", refresh=False)
        if state.update_in_epoch < updates_per_epoch and should_stop is not None and should_stop():
            preempted = True
            break
        if after_update is not None and state.update_in_epoch < updates_per_epoch:
            after_update()
    bar.close()

    elapsed = time.perf_counter() - start
    count = torch.tensor([float(micro_batches)], device=device)
    loss_sum = accelerator.reduce(loss_sum.reshape(1), reduction="sum")
    count = accelerator.reduce(count, reduction="sum")
    return {"train_loss": (loss_sum / count.clamp(min=1)).item() if count.item() else float("nan"),
            "train_lr": lr,
            "images_per_sec": images * accelerator.num_processes / max(elapsed, 1e-9),
            "epoch_time": elapsed,
            "preempted": float(preempted)}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, accelerator, *, channels_last: bool = False,
             progress: bool = True) -> Dict[str, float]:
    """Top-1/top-5 accuracy (%) and cross-entropy over the whole eval set; ``loader`` must be Accelerate-prepared."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, top-1, top-5, count
    bar = _progress(len(loader), 0, "eval", progress and accelerator.is_main_process)
    for samples, targets in loader:
        samples = samples.to(device, non_blocking=True)
        if channels_last:
            samples = samples.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            output = model(samples).float()
        targets = targets.to(output.device)
        loss = F.cross_entropy(output, targets, reduction="none")
        top = output.topk(min(5, output.shape[1]), dim=1).indices.eq(targets[:, None])
        # gather_for_metrics drops the samples Accelerate repeated to give every process a full last batch; on the
        # accelerator's device, which NCCL needs, also for a model evaluated elsewhere (--model-ema-force-cpu)
        loss, top1, top5 = accelerator.gather_for_metrics(
            tuple(t.to(accelerator.device) for t in (loss, top[:, 0], top.any(dim=1))))
        totals += torch.stack([loss.double().sum(), top1.double().sum(), top5.double().sum(),
                               torch.tensor(float(loss.numel()), dtype=torch.float64, device=loss.device)]
                              ).to(totals.device)
        bar.update()
    bar.close()
    loss, top1, top5, count = totals.tolist()
    return {"loss": loss / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count}
