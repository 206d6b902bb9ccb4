"""The loop: ``train_one_epoch`` and ``evaluate`` (DeiT's engine.py, on Accelerate).

The learning rate is a function of where training stands (epoch and optimizer update), set before every update from
the timm scheduler: per epoch by default (as DeiT III), per update with ``--sched-on-updates``. A resumed run
therefore sees exactly the lr sequence of an uninterrupted one (DeiT's resume runs one epoch ahead on the schedule).
"""
import math
import sys
import time
from datetime import timedelta
from types import MappingProxyType
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from tract.checkpoint import TrainState, repair_links
from tract.errors import ConfigError
from tract.method import TrAct, find_first_layer
from tract.models import optimizer_eps

__all__ = ["OPTIMIZER_ALIASES", "TORCH_FUSED", "SplitOptimizer", "first_layer_name", "build_optimizer",
           "build_scheduler", "scaled_lr", "lr_warning", "build_criterion", "build_mixup", "mixup_active", "Progress",
           "train_one_epoch", "evaluate", "evaluate_and_log", "save_every"]

# DeiT's apex optimizers -> timm's names. timm's lamb clips the global gradient norm at max_grad_norm=1.0 before its
# update, as apex FusedLAMB does (timm/optim/lamb.py: _get_clip_grad_norm).
OPTIMIZER_ALIASES = {"fusedlamb": "lamb", "fusedadam": "adam", "fusedadamw": "adamw", "fusedsgd": "sgd",
                     "fusednovograd": "novograd"}
# The aliases whose timm optimizer is torch's, which has a fused kernel (torch.optim: fused=True). timm's lamb and
# novograd have none: their fused* names run timm's single-tensor loops.
TORCH_FUSED = ("adam", "adamw", "sgd")


class SplitOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped, scheduled and saved as one (paper Fig. 9: the first
    layer on SGD, the rest on ``--opt``).

    ``param_groups`` are the inner optimizers' own group dicts, in order, so a scheduler that sets each group's lr
    (timm's, which multiplies by a group's ``lr_scale``) reaches them. ``state_dict`` is one ordinary torch optimizer
    state, parameters numbered across the inner optimizers in order, so Accelerate's prepare / save_state and the
    checkpoint code handle it like any optimizer; ``load_state_dict`` splits it back by group counts.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], labels: Optional[Sequence[str]] = None):
        self.optimizers = list(optimizers)
        self.labels = list(labels) if labels is not None else [type(o).__name__ for o in self.optimizers]
        params = [p for o in self.optimizers for group in o.param_groups for p in group["params"]]
        # torch's __init__ sets up the hooks and refuses a parameter held twice; its own groups and state are
        # replaced by the inner optimizers' below (the defaults are the first, main optimizer's: eps, fused, ...).
        super().__init__(params, dict(self.optimizers[0].defaults))
        self._link_groups()

    def _link_groups(self) -> None:
        # torch's load_state_dict gives an optimizer new group dicts: link to the current ones after every load.
        self.param_groups = [group for o in self.optimizers for group in o.param_groups]

    @property
    def state(self) -> MappingProxyType:
        """Every parameter's optimizer state (read-only: each inner optimizer owns its own)."""
        return MappingProxyType({p: s for o in self.optimizers for p, s in o.state.items()})

    @state.setter
    def state(self, value) -> None:
        if value:  # torch's __init__ assigns an empty state; anything else would be silently lost
            raise AttributeError("a SplitOptimizer's state belongs to its inner optimizers: load_state_dict instead")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Step every inner optimizer (a closure is evaluated once, before)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients of every inner optimizer's parameters."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        """One torch optimizer state dict: the inner ones concatenated, parameter indices offset in order."""
        state: Dict[int, Any] = {}
        groups: List[Dict[str, Any]] = []
        offset = 0
        for optimizer in self.optimizers:
            inner = optimizer.state_dict()
            state.update({index + offset: value for index, value in inner["state"].items()})
            groups += [{**group, "params": [i + offset for i in group["params"]]} for group in inner["param_groups"]]
            offset += sum(len(group["params"]) for group in optimizer.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load what ``state_dict`` returned: each inner optimizer gets its groups and their parameters' state."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the optimizer state has {len(groups)} parameter groups, this {' + '.join(self.labels)} "
                             f"split has {len(self.param_groups)}: it was saved with another --first-layer-opt / --opt")
        first_group, offset = 0, 0
        for optimizer in self.optimizers:
            mine = groups[first_group:first_group + len(optimizer.param_groups)]
            indices = {i for group in mine for i in group["params"]}
            optimizer.load_state_dict({
                "state": {i - offset: value for i, value in state_dict["state"].items() if i in indices},
                "param_groups": [{**group, "params": [i - offset for i in group["params"]]} for group in mine]})
            first_group += len(mine)
            offset += sum(len(group["params"]) for group in mine)
        self._link_groups()


def first_layer_name(args, model: nn.Module) -> str:
    """The layer --tract wraps (or would wrap): the one TrAct layer, else ``--tract-layer``, else find_first_layer."""
    wrapped = [name for name, module in model.named_modules() if isinstance(module, TrAct)]
    if len(wrapped) == 1:
        return wrapped[0]
    try:
        name = args.tract_layer or find_first_layer(model)
        model.get_submodule(name)
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"cannot find the model's first layer: {e} (name it with --tract-layer)") from None
    return name


def build_optimizer(args, model: nn.Module, lr: float, device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """timm's create_optimizer_v2 (no weight decay on 1-D params, biases, pos_embed, cls_token) at ``lr``.

    A ``fused*`` name whose timm optimizer is torch's gets ``fused=True`` where torch has the kernel for ``device``
    (CUDA, and the CPU: measured 2.2x faster than the for-loop there), else ``foreach=True``. ``--opt-kwargs`` go to
    the optimizer last and win. With ``--first-layer-opt sgd`` the first layer gets its own torch SGD with momentum
    and the two are one SplitOptimizer (the paper's Fig. 9).
    """
    from timm.optim import create_optimizer_v2, list_optimizers

    name = OPTIMIZER_ALIASES.get(args.opt.lower(), args.opt.lower())
    known = list_optimizers()
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known + list(OPTIMIZER_ALIASES), n=3)
        raise ConfigError(f"unknown optimizer '{args.opt}'" + (f"; closest: {', '.join(close)}" if close else "") +
                          " (timm.optim.list_optimizers() lists them)")
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
    first = first_layer_name(args, model) if args.first_layer_opt == "sgd" else None
    params = model if first is None else _groups_without(model, args.weight_decay, model.get_submodule(first))
    try:
        main = create_optimizer_v2(params, opt=name, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
                                   **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--opt {args.opt} refused its arguments {kwargs}: {e}; check --opt-kwargs") from None
    if first is None:
        return main
    # The schedule's base is the main lr ('initial_lr', which timm's scheduler keeps); timm sets each group's lr to
    # schedule(t) x 'lr_scale', so the first layer's lr is --first-layer-lr-mult x the rest's at every update.
    layer_group = {"params": list(model.get_submodule(first).parameters()), "lr": lr * args.first_layer_lr_mult,
                   "initial_lr": lr, "lr_scale": args.first_layer_lr_mult}
    sgd = torch.optim.SGD([layer_group], lr=lr * args.first_layer_lr_mult, momentum=args.first_layer_momentum,
                          weight_decay=args.first_layer_weight_decay)
    return SplitOptimizer([main, sgd], labels=[type(main).__name__, f"SGD for {first}"])


def _groups_without(model: nn.Module, weight_decay: float, layer: nn.Module) -> List[Dict[str, Any]]:
    """timm's weight-decay parameter groups of ``model`` (as create_optimizer_v2 makes them), ``layer`` left out."""
    from timm.optim import param_groups_weight_decay

    left_out = {id(p) for p in layer.parameters()}
    no_weight_decay = getattr(model, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_weight_decay)
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in left_out]} for g in groups]
    return [g for g in groups if g["params"]]


def build_scheduler(args, optimizer, updates_per_epoch: int):
    """timm's create_scheduler_v2, stepped per epoch (DeiT) or per update (``--sched-on-updates``)."""
    from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2

    if args.sched == "multistep":
        unit = updates_per_epoch if args.sched_on_updates else 1
        # timm applies a milestone m from step m - 1 (its convention, timm/scheduler/multistep_lr.py); m x unit + 1
        # changes the lr after m whole epochs, as torch's MultiStepLR and the paper's "60 epochs at 0.1" mean.
        return MultiStepLRScheduler(optimizer, decay_t=[m * unit + 1 for m in args.decay_milestones],
                                    decay_rate=args.decay_rate, warmup_t=args.warmup_epochs * unit,
                                    warmup_lr_init=args.warmup_lr, warmup_prefix=False,
                                    t_in_epochs=not args.sched_on_updates)

    scheduler, _ = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                       decay_epochs=args.decay_epochs, decay_rate=args.decay_rate,
                                       min_lr=args.min_lr, warmup_lr=args.warmup_lr,
                                       warmup_epochs=args.warmup_epochs, step_on_epochs=not args.sched_on_updates,
                                       updates_per_epoch=updates_per_epoch)
    return scheduler


def scaled_lr(args, global_batch: int) -> float:
    """The peak lr: --lr scaled by global batch / 512 (DeiT's linear rule), or as given with --unscale-lr."""
    return args.lr if args.unscale_lr else args.lr * global_batch / 512


def lr_warning(args, lr: float) -> Optional[str]:
    """What is wrong with a peak ``lr`` at or below the schedule's floor or warmup start (None when nothing is)."""
    how = "--lr as given (--unscale-lr)" if args.unscale_lr else f"--lr {args.lr:g} scaled by global batch / 512"
    problems = []
    if args.sched in ("cosine", "tanh", "poly") and lr <= args.min_lr:
        problems.append(f"equal to --min-lr {args.min_lr:g}, so the {args.sched} schedule stays flat (DeiT III's "
                        "finetuning recipe does so on purpose)" if math.isclose(lr, args.min_lr) else
                        f"below --min-lr {args.min_lr:g}, so the {args.sched} schedule rises instead of decaying")
    if args.warmup_epochs > 0 and lr <= args.warmup_lr:
        problems.append(f"at or below --warmup-lr {args.warmup_lr:g}, so the warmup goes down instead of up")
    if not problems:
        return None
    return (f"the peak lr {lr:.3g} ({how}) is " + "; and ".join(problems) +
            ": raise --lr (or lower --min-lr / --warmup-lr)")


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


def _bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal; disabled elsewhere (a log file gets lines, not bar redraws)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and sys.stderr.isatty()),
                dynamic_ncols=True, leave=False)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds))) if math.isfinite(seconds) else "?"


class Progress:
    """Progress inside an epoch: a tqdm bar on a terminal, else (SLURM, nohup, ``| tee``) a time-stamped line every
    ``log_interval`` updates, as timm's train.py prints; both with loss, lr, images/s and the ETAs of the epoch and of
    the run's training (evaluations not included). Only ``enabled`` processes (the main one) show anything."""

    def __init__(self, state: TrainState, updates_per_epoch: int, epochs: int, *, enabled: bool,
                 log_interval: int = 50):
        self.updates_per_epoch, self.epochs, self.log_interval = updates_per_epoch, epochs, log_interval
        self.epoch = state.epoch + 1  # numbered from 1, as log.txt and the checkpoint folders
        self.first = state.update_in_epoch
        self.bar = _bar(updates_per_epoch, state.update_in_epoch, f"epoch {self.epoch}/{epochs}", enabled)
        self.lines = enabled and not sys.stderr.isatty()
        self.start = time.perf_counter()

    def line_due(self, update: int) -> bool:
        """Whether a progress line is printed after ``update`` (which costs a host read of the loss)."""
        return self.lines and (update % self.log_interval == 0 or update == self.updates_per_epoch)

    def show(self, update: int, loss: float, lr: float, images: int) -> None:
        """Report after ``update`` of the epoch: ``loss`` the epoch's mean so far, ``images`` seen by all processes."""
        elapsed = time.perf_counter() - self.start
        per_update = elapsed / max(update - self.first, 1)
        left_epoch = (self.updates_per_epoch - update) * per_update
        left_run = left_epoch + (self.epochs - self.epoch) * self.updates_per_epoch * per_update
        rate = images / max(elapsed, 1e-9)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}",
                             eta_run=_duration(left_run), refresh=False)
        if self.line_due(update):
            width = len(str(self.updates_per_epoch))
            print(f"{time.strftime('%H:%M:%S')} epoch {self.epoch}/{self.epochs} [{update:>{width}}/"
                  f"{self.updates_per_epoch}] loss {loss:.4f}  lr {lr:.3e}  {rate:.0f} img/s  eta epoch "
                  f"{_duration(left_epoch)}, run {_duration(left_run)}", flush=True)

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


def _log_rows(rows: List[tuple], read: List[float], log_updates: Optional[Callable]) -> None:
    """Hand (update, lr, loss, grad norm) rows, their device values read back as ``read`` (losses, then the grad norms
    that exist), to ``log_updates`` as (update, {loss, lr[, grad_norm]})."""
    if not rows:
        return
    losses, norms = read[:len(rows)], iter(read[len(rows):])
    log_updates([(step, {"loss": value, "lr": lr, **({"grad_norm": next(norms)} if norm is not None else {})})
                 for (step, lr, _, norm), value in zip(rows, losses)])


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer, scheduler, criterion: nn.Module, accelerator,
                    state: TrainState, updates_per_epoch: int, *, mixup_fn: Optional[Callable] = None, ema=None,
                    clip_grad: Optional[float] = None, should_stop: Optional[Callable[[], bool]] = None,
                    after_update: Optional[Callable[[], None]] = None, channels_last: bool = False,
                    sync_interval: int = 20, progress: bool = True, log_interval: int = 50,
                    epochs: Optional[int] = None,
                    log_updates: Optional[Callable[[List[Tuple[int, Dict[str, float]]]], None]] = None
                    ) -> Dict[str, float]:
    """Train from ``state.update_in_epoch`` to the end of epoch ``state.epoch``; advance ``state`` as it goes.

    ``loader`` yields this process's micro-batches from the current position on (on the device already, or moved
    here). ``should_stop`` is asked after every update but the last of the epoch, then ``after_update`` is called.
    The loop reads the device only every ``sync_interval`` updates (loss check, progress, and the per-update loss /
    lr / grad norm handed to ``log_updates`` as (update, values) rows), and for a progress line every
    ``log_interval`` updates off a terminal. Returns train_loss, train_lr, images_per_sec, epoch_time and
    ``preempted`` (1.0 when ``should_stop`` ended the epoch early).
    """
    model.train()
    device = accelerator.device
    unwrapped = accelerator.unwrap_model(model)
    scheduler.step(state.epoch)  # per-epoch schedules: lr(epoch); per-update ones ignore this call
    scheduler.step_update(state.num_updates)  # per-update schedules: lr(update); per-epoch ones ignore it
    # A resumed epoch goes on from the statistics its checkpoint carried: its log line is the uninterrupted one's.
    carried = state.carried(accelerator.process_index, accelerator.num_processes)
    loss_sum = torch.tensor(carried["loss_sum"], dtype=torch.float32, device=device)
    micro_batches, images, preempted = carried["micro_batches"], carried["images"], False
    lr = optimizer.param_groups[0]["lr"]
    step_loss, step_micro, rows = torch.zeros((), device=device), 0, []  # this update's loss; updates not yet logged
    shown = Progress(state, updates_per_epoch, epochs or state.epoch + 1,
                     enabled=progress and accelerator.is_main_process, log_interval=log_interval)
    start = time.perf_counter() - carried["elapsed"]
    state.live = lambda: (loss_sum, micro_batches, images, time.perf_counter() - start)  # what a checkpoint saves
    for samples, targets in loader:
        if state.update_in_epoch >= updates_per_epoch:
            break
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            samples = samples.contiguous(memory_format=torch.channels_last)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        grad_norm = None
        with accelerator.accumulate(model):  # skips the DDP all-reduce on all but the last micro-batch
            loss = criterion(model(samples), targets)
            accelerator.backward(loss)  # divides by the accumulation steps
            if clip_grad is not None and accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()  # Accelerate's wrapper steps only when the gradients are complete
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        micro_batches += 1
        images += samples.shape[0]
        if log_updates is not None:
            step_loss = step_loss + loss.detach()
            step_micro += 1
        if not accelerator.sync_gradients:
            continue

        lr = optimizer.param_groups[0]["lr"]
        state.num_updates += 1
        state.update_in_epoch += 1
        scheduler.step_update(state.num_updates)
        if ema is not None:
            ema.update(unwrapped, step=state.num_updates)
        shown.bar.update()
        if log_updates is not None:
            rows.append((state.num_updates, lr, step_loss / step_micro, grad_norm))
            step_loss, step_micro = torch.zeros((), device=device), 0
        check = state.update_in_epoch % sync_interval == 0 or state.update_in_epoch == updates_per_epoch
        if check or shown.line_due(state.update_in_epoch):
            # One host read for the epoch's loss so far and the per-update values since the last read. At a check
            # the loss is summed over processes (every process checks after the same updates), so that all of them
            # stop together on a non-finite loss; a progress line between checks (main process only) shows its own.
            total = accelerator.reduce(loss_sum.reshape(1), reduction="sum") if check else loss_sum.reshape(1)
            read = torch.stack([total[0].float(), *[r[2].float() for r in rows],
                                *[r[3].float() for r in rows if r[3] is not None]]).tolist()
            mean_loss = read[0] / (micro_batches * (accelerator.num_processes if check else 1))
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} at update {state.num_updates}: training diverged "
                                         "(lower --lr, or check the data)")
            _log_rows(rows, read[1:], log_updates)
            rows = []
            shown.show(state.update_in_epoch, mean_loss, lr, (images - carried["images"]) * accelerator.num_processes)
        if state.update_in_epoch < updates_per_epoch and should_stop is not None and should_stop():
            preempted = True
            break
        if after_update is not None and state.update_in_epoch < updates_per_epoch:
            after_update()
    shown.close()
    if rows:  # stopped between two reads (preempted): the updates since the last one
        _log_rows(rows, torch.stack([r[2].float() for r in rows] + [r[3].float() for r in rows if r[3] is not None]
                                    ).tolist(), log_updates)

    elapsed = time.perf_counter() - start
    count = torch.tensor([float(micro_batches)], device=device)
    total = accelerator.reduce(loss_sum.reshape(1), reduction="sum")  # loss_sum stays this process's: a checkpoint
    count = accelerator.reduce(count, reduction="sum")  # written after a preemption saves it
    return {"train_loss": (total / count.clamp(min=1)).item() if count.item() else float("nan"),
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
    bar = _bar(len(loader), 0, "eval", progress and accelerator.is_main_process)
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


def evaluate_and_log(number: int, train_stats: Dict[str, float], *, args, model: nn.Module, ema, loader: Iterable,
                     accelerator, state: TrainState, run_log, checkpoints: Path, n_parameters: int,
                     log: Callable[[str], None] = print) -> None:
    """After epoch ``number`` (from 1): evaluate the model (and the EMA) if --val-interval says so, take a better
    test_acc1 as the best (repointing ``checkpoints/best``), write the epoch's line to ``run_log`` (unless it has it:
    an epoch evaluated again after a resume) and tell the user."""
    stats, evaluated = dict(train_stats), number % args.val_interval == 0 or number == args.epochs
    # The eval loader draws its seed from the global RNG: forked, so training's random stream is the same whether or
    # not an evaluation ran in between (a resume may or may not have to redo one).
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        for prefix, net in (("test", model), ("test_ema", ema.module if ema is not None else None)):
            if evaluated and net is not None and (prefix == "test" or args.model_ema_eval):
                stats.update({f"{prefix}_{k}": v for k, v in evaluate(
                    net, loader, accelerator, channels_last=args.channels_last, progress=args.progress).items()})
    if evaluated and stats["test_acc1"] > state.best_acc1:
        state.best_acc1, state.best_epoch = stats["test_acc1"], number - 1
        if accelerator.is_main_process:
            repair_links(checkpoints, state)
    if not run_log.has(number):  # evaluated again after a resume: the best counts it, the log has it
        run_log.write({"epoch": number, **stats, "n_parameters": n_parameters}, step=state.num_updates)
    state.pending = {}
    tested = (f"test_acc1 {stats['test_acc1']:.2f}%  test_acc5 {stats['test_acc5']:.2f}%" if evaluated
              else "not evaluated (--val-interval)")
    log(f"epoch {number}/{args.epochs}: train_loss {stats['train_loss']:.4f}  {tested}  "
        f"({stats['epoch_time']:.0f} s, {stats['images_per_sec']:.0f} img/s)  best " +
        (f"{state.best_acc1:.2f}% (epoch {state.best_epoch + 1})" if state.best_acc1 >= 0 else "none yet"))


def save_every(updates: int, state: TrainState, save: Callable[[], Any]) -> None:
    """train_one_epoch's ``after_update`` for --checkpoint-interval-updates: ``save()`` at every multiple of
    ``updates`` optimizer updates (never when 0), as preemption saves."""
    if updates and state.num_updates % updates == 0:
        save()
