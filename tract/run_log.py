"""The record of a run: the summary printed at its start, DeiT's ``log.txt`` (one JSON line per epoch) and
TensorBoard scalars.

A resumed run continues the record from its checkpoint: lines of the epochs the checkpoint does not hold are dropped
(a torn last line too), ``summary.csv`` is rewritten from the lines kept, and TensorBoard's events past the
checkpoint's update are purged, so the record and the checkpoint agree whatever point a kill came at.
"""
import csv
import io
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from tract.engine import SplitOptimizer, lr_warning, mixup_active
from tract.global_batch import describe_global_batch
from tract.run_lock import RunFolderLost, check_still_held
from tract.safe_files import UnsafeFileError, append_text, read_json_lines, write_atomic, write_failed

__all__ = ["RunLog", "read_log", "run_summary", "describe_optimizer", "describe_first_layer", "describe_loss",
           "describe_augmentation", "describe_patch_norm", "MAX_LOG_BYTES"]

MAX_LOG_BYTES = 1 << 26  # a line per epoch: a few hundred KB for the longest recipes
# summary.csv's columns: timm.utils.update_summary's, as timm's train.py writes them
SUMMARY_FIELDS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")


def run_summary(args, accelerator, data, place, *, n_parameters: int, lr: float, optimizer, criterion,
                tract_layer: Optional[str]) -> Dict[str, Any]:
    """What a run will do, one line per item: train.py prints it at the start and ``--dry-run`` stops after it."""
    global_batch = args.batch_size * accelerator.num_processes * args.accum_steps
    warning = lr_warning(args, lr)
    return {
        "parameters": n_parameters, "classes": data.num_classes, "train images": len(data.train_set),
        "val images": len(data.val_set),
        "input": f"{args.input_size} px, {args.in_chans} channel(s), mean {_numbers(data.mean)}, std "
                 f"{_numbers(data.std)}",
        "data resize": data.describe_resize(args.input_size, args.eval_crop_ratio),
        "augmentation": describe_augmentation(args),
        "loss": describe_loss(criterion),
        "processes": accelerator.num_processes,
        "global batch": describe_global_batch(args.global_batch, args.batch_size, accelerator.num_processes,
                                              args.accum_steps),
        "per-process batch": args.batch_size, "accumulation steps": args.accum_steps,
        "updates per epoch": data.updates_per_epoch, "epochs": args.epochs,
        "lr": f"{lr:.6g}" + (" (--unscale-lr)" if args.unscale_lr else
                             f" (--lr {args.lr:g} per 512 images x global batch {global_batch} / 512)") +
              (f"; WARNING: {warning}" if warning else ""),
        "schedule": f"{args.sched} to --min-lr {args.min_lr:g}, stepped per " +
                    ("update" if args.sched_on_updates else "epoch"),
        "warmup": (f"{args.warmup_epochs} epoch(s) from --warmup-lr {args.warmup_lr:g}" if args.warmup_epochs
                   else "none"),
        "optimizer": f"{type(optimizer).__name__}, eps {optimizer.defaults.get('eps', 'none')}",
        "first-layer optimizer": describe_first_layer(optimizer),
        "tract": f"on, layer {tract_layer}, lambda {args.tract_lambda}" if tract_layer else "off",
        "patch norm": describe_patch_norm(args.patch_norm),
        "precision": accelerator.mixed_precision, "device": str(accelerator.device), "output": place.output_dir,
        "resume": place.checkpoint or ("from the start (no checkpoint yet)" if place.continues else "no"),
        "optimizer implementation": describe_optimizer(optimizer),
        "compile": (f"torch.compile, backend {args.torchcompile}, mode {args.torchcompile_mode or 'default'}"
                    if args.torchcompile else "off (eager)"),
        "channels last": "on" if args.channels_last else "off",
        "input path": data.describe_input_path(),
        "tf32, cudnn.benchmark": (f"{'on' if args.tf32 else 'off'}, {'on' if args.cudnn_benchmark else 'off'}"
                                  if torch.cuda.is_available() else "n/a (no CUDA)"),
        "host syncs": f"every {args.sync_interval} updates" + (" (TrAct adds one, at its first backward: its dtype)"
                                                                if tract_layer else ""),
        "evaluation": f"every {args.val_interval} epoch(s) and after the last",
        "mid-epoch checkpoints": (f"every {args.checkpoint_interval_updates} updates"
                                  if args.checkpoint_interval_updates else "off"),
    }


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """Which implementation steps: the class and, for torch's optimizers, fused / foreach / for-loop."""
    if isinstance(optimizer, SplitOptimizer):
        parts = zip(optimizer.labels, optimizer.optimizers)
        return "; ".join(f"{label}: {describe_optimizer(inner)}" for label, inner in parts)
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


def describe_first_layer(optimizer: torch.optim.Optimizer) -> str:
    """The first layer's optimizer, as the dry run prints it (read from the optimizer built)."""
    if not isinstance(optimizer, SplitOptimizer):
        return "with the rest (--first-layer-opt same)"
    group = optimizer.optimizers[-1].param_groups[0]
    return (f"{optimizer.labels[-1]}, momentum {group['momentum']:g}, lr {group['lr_scale']:g} x the rest's on the "
            f"same schedule, weight decay {group['weight_decay']:g}; the rest {optimizer.labels[0]}")


def describe_loss(criterion: nn.Module) -> str:
    """The training loss in words (the dry-run summary's line)."""
    smoothing = getattr(criterion, "smoothing", None)
    if type(criterion).__name__ == "BinaryCrossEntropy":
        return "BinaryCrossEntropy on targets binarised above 0 (DeiT III)"
    if type(criterion).__name__ == "SoftTargetCrossEntropy":
        return "SoftTargetCrossEntropy (mixup / cutmix targets, smoothed by them)"
    return type(criterion).__name__ + (f", smoothing {smoothing:g}" if smoothing else "")


def describe_augmentation(args) -> str:
    """The training augmentation in words (the dry-run summary's line)."""
    if args.three_augment:
        parts = ["3-Augment (grayscale / solarize / blur, DeiT III)"]
    else:
        parts = []
    parts.insert(0, "simple random crop (resize, pad 4, crop; --src)" if args.src
                 else "RandomResizedCrop (scale 0.08-1)")
    parts.append("horizontal flip")
    if args.color_jitter and not args.aa:
        parts.append(f"color jitter {args.color_jitter:g}")
    if args.aa:
        parts.append(f"RandAugment {args.aa}")
    if args.reprob > 0:
        parts.append(f"random erasing p {args.reprob:g}")
    if mixup_active(args):
        parts.append(f"mixup {args.mixup:g} / cutmix {args.cutmix:g}")
    return ", ".join(parts)


def describe_patch_norm(mode: str) -> str:
    """--patch-norm as the dry run prints it."""
    return {"none": "none", "patch": "patch: every input patch standardised on its own before patch_embed.proj",
            "dual": "dual (DualPatchNorm): LayerNorm over each input patch before patch_embed.proj and over each "
                    "token after it"}[mode]


def _line_checker() -> Callable[[Any], None]:
    """A check of log.txt's lines in order (ValueError for one train.py cannot have written): an epoch's line has a
    positive whole epoch, later than the line before, accuracies in [0, 100] and finite numbers; a resume-override
    line says what changed and after which epoch."""
    last = [0]

    def check(line: Any) -> None:
        if not isinstance(line, dict):
            raise ValueError("not a JSON object")
        if "epoch" not in line:
            if set(line) != {"resume_override", "after_epoch", "time"} or not isinstance(line["resume_override"], str) \
                    or type(line["after_epoch"]) is not int or not 0 <= line["after_epoch"] <= last[0] + 1:
                raise ValueError("neither an epoch's line nor a resume-override line")
            return
        epoch = line["epoch"]
        if type(epoch) is not int or not last[0] < epoch < 1 << 31:
            raise ValueError(f"epoch {epoch!r} is not a whole number after the line before's {last[0]}")
        for key, value in line.items():
            if not (isinstance(key, str) and len(key) <= 64):
                raise ValueError(f"key {str(key)[:64]!r} is not a statistic's name")
            if key.endswith(("acc1", "acc5")) and not (type(value) in (int, float) and 0 <= value <= 100):
                raise ValueError(f"{key} {value!r} is not an accuracy in [0, 100]")
            if not (type(value) in (int, float) or (isinstance(value, str) and len(value) <= 64)):
                raise ValueError(f"{key} {str(value)[:64]!r} is not a number")
        last[0] = epoch

    return check


def read_log(path: Path) -> List[Dict]:
    """The lines of a ``log.txt``, each checked (``_line_checker``); a line cut short by a kill is left out. A log
    that is a link, beyond MAX_LOG_BYTES or holds a line train.py cannot have written (an accuracy of 1000, NaN, a
    string for a number) is refused, naming the file and the line."""
    if not os.path.lexists(path):
        return []
    try:
        return read_json_lines(Path(path), MAX_LOG_BYTES, _line_checker())
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{e}: not a line train.py writes. Restore or delete that line, then rerun the command "
                              f"with --resume {Path(path).parent}") from None


def _place(line: Dict) -> int:
    """The epochs done when a log line was written (an epoch's line: its number)."""
    return line["epoch"] if "epoch" in line else line["after_epoch"]


def _numbers(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


class RunLog:
    """The run's record in OUTPUT: ``log.txt`` (one JSON line per epoch, DeiT's, with a time stamp), ``summary.csv``
    (timm's ``update_summary`` columns: epoch, train_loss, eval_loss, eval_top1, eval_top5, lr) and TensorBoard
    (per-epoch numbers, per-update loss / lr / grad norm, and the run's hyperparameters for the HParams tab).

    Epochs are numbered from 1, as the checkpoint folders are (``epoch-0003`` is written after epoch 3). TensorBoard's
    step is the optimizer update, for per-epoch numbers too. ``resume_epoch`` / ``resume_step``: the epochs and
    updates done in the checkpoint the run continues from; the record past them is removed.
    """

    SUMMARY = "summary.csv"

    def __init__(self, output_dir: Path, enabled: bool = True, resume_epoch: Optional[int] = None,
                 resume_step: Optional[int] = None, hparams: Optional[Dict[str, Any]] = None):
        self.path = Path(output_dir) / "log.txt"
        self.summary = Path(output_dir) / self.SUMMARY
        self.writer = None
        self.records: List[Dict] = []
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            lines = [r for r in read_log(self.path) if resume_epoch is None or _place(r) <= resume_epoch]
            self.records = [r for r in lines if "epoch" in r]
            if resume_epoch is not None:
                # Rewritten whole, never through a link planted in the folder (safe_files).
                try:
                    write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in lines).encode())
                    if self.records:
                        write_atomic(self.summary, _summary_lines(self.records, header=True).encode())
                    else:
                        self.summary.unlink(missing_ok=True)
                except OSError as e:
                    raise write_failed(self.path, e, self.path.parent) from None
            resume_step = resume_step if resume_epoch is not None else None
            _quiet_tensorboard_thread()
            self.writer = SummaryWriter(log_dir=str(output_dir),
                                        purge_step=None if resume_step is None else resume_step + 1)
            if hparams is not None and not resume_step:  # once per run: at its start (step 0)
                self._write_hparams(hparams)

    def _write_hparams(self, hparams: Dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        plain = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
        # The metrics are the per-epoch scalars of the same run, which the HParams tab then shows beside them.
        for summary in hparams_summary(plain, {"test/acc1": None, "test/loss": None, "train/loss": None}):
            self.writer.file_writer.add_summary(summary, 0)
        self.writer.flush()

    def has(self, epoch: int) -> bool:
        """Whether the record holds a line for ``epoch`` (numbered from 1)."""
        return any(r["epoch"] == epoch for r in self.records)

    def write(self, stats: Dict[str, Any], step: int) -> None:
        """Log one epoch's stats (with a time stamp); TensorBoard tags are ``train/loss``-style, at update ``step``."""
        if self.writer is None:
            return
        stats = {**stats, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        check_still_held(self.path.parent)
        try:
            append_text(self.path, json.dumps(stats) + "\n")
            header = not self.summary.exists() or self.summary.stat().st_size == 0
            append_text(self.summary, _summary_lines([stats], header=header))
        except OSError as e:
            check_still_held(self.path.parent)  # the folder deleted during the write: that is the message
            raise write_failed(self.path, e, self.path.parent) from None
        self.records.append(stats)
        for key, value in stats.items():
            if key not in ("epoch", "n_parameters") and isinstance(value, (int, float)):
                split, _, name = key.partition("_")
                self.writer.add_scalar(f"{split}/{name}" if name else key, value, step)
        self.writer.flush()

    def updates(self, rows: Sequence[Tuple[int, Dict[str, float]]]) -> None:
        """Per-update TensorBoard scalars (``update/loss``, ``update/lr``, ``update/grad_norm``), as (step, values)."""
        if self.writer is None:
            return
        check_still_held(self.path.parent)  # TensorBoard appends by path: never into a folder this run lost
        for step, values in rows:
            for key, value in values.items():
                self.writer.add_scalar(f"update/{key}", value, step)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (abandoned, unflushed, when the run lost its folder). Its failure (a
        full disk: a background thread appends the events) is one message, never raised over an error in flight."""
        if self.writer is None:
            return
        raising = sys.exc_info()[1] is not None  # called from a `finally` while another error propagates
        try:
            check_still_held(self.path.parent)
        except RunFolderLost:
            return  # nothing more goes into a folder that is no longer this run's; the error raised says so
        try:
            self.writer.close()
        except OSError as e:
            if not raising:
                raise write_failed(self.path.parent, e, self.path.parent) from None


def _quiet_tensorboard_thread() -> None:
    """TensorBoard appends events from a background thread, which prints a traceback when a write fails (a full
    disk) and keeps the error for the main thread's next write or close, where RunLog tells it as one message: the
    thread's own traceback is left out. Other threads' errors go to the hook that was there."""
    previous = threading.excepthook
    if getattr(previous, "_tract", False):
        return

    def hook(args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            previous(args)

    hook._tract = True
    threading.excepthook = hook


def _summary_lines(records: Sequence[Dict[str, Any]], header: bool) -> str:
    """Epochs as ``summary.csv`` lines in timm's layout (``SUMMARY_FIELDS``); an epoch without evaluation
    (--val-interval) has empty eval cells, so the columns stay aligned. Written here, not by timm's update_summary,
    which opens the file through any link planted in its place."""
    out = io.StringIO()
    writer = csv.writer(out)
    if header:
        writer.writerow(SUMMARY_FIELDS)
    for r in records:
        writer.writerow([r["epoch"], r.get("train_loss"), r.get("test_loss"), r.get("test_acc1"), r.get("test_acc5"),
                         r.get("train_lr")])
    return out.getvalue()
