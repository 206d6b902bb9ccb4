"""The record of a run: the summary printed at its start, DeiT's ``log.txt`` (one JSON line per epoch) and
TensorBoard scalars.

A resumed run continues the record from its checkpoint: lines of the epochs the checkpoint does not hold are dropped
(a torn last line too) and TensorBoard's events from that epoch on are purged, so the record and the checkpoint agree
whatever point a kill came at.
"""
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["RunLog", "read_log", "run_summary"]


def run_summary(args, accelerator, data, place, *, n_parameters: int, lr: float, optimizer,
                tract_layer: Optional[str]) -> Dict[str, Any]:
    """What a run will do, one line per item: train.py prints it at the start and ``--dry-run`` stops after it."""
    import torch

    from tract.engine import describe_optimizer

    global_batch = args.batch_size * accelerator.num_processes * args.accum_steps
    return {
        "parameters": n_parameters, "classes": data.num_classes, "train images": len(data.train_set),
        "val images": len(data.val_set), "processes": accelerator.num_processes, "global batch": global_batch,
        "per-process batch": args.batch_size, "accumulation steps": args.accum_steps,
        "updates per epoch": data.updates_per_epoch, "epochs": args.epochs, "lr": f"{lr:.6g}",
        "optimizer": f"{type(optimizer).__name__}, eps {optimizer.defaults.get('eps', 'none')}",
        "tract": f"on, layer {tract_layer}, lambda {args.tract_lambda}" if tract_layer else "off",
        "precision": accelerator.mixed_precision, "device": str(accelerator.device), "output": place.output_dir,
        "resume": place.checkpoint or ("from the start (no checkpoint yet)" if place.continues else "no"),
        "optimizer implementation": describe_optimizer(optimizer),
        "compile": (f"torch.compile, backend {args.torchcompile}, mode {args.torchcompile_mode or 'default'}"
                    if args.torchcompile else "off (eager)"),
        "channels last": "on" if args.channels_last else "off",
        "input path": data.describe_input_path(),
        "tf32, cudnn.benchmark": (f"{'on' if args.tf32 else 'off'}, {'on' if args.cudnn_benchmark else 'off'}"
                                  if torch.cuda.is_available() else "n/a (no CUDA)"),
        "host syncs": f"every {args.sync_interval} updates" + (
            ", and one per micro-batch at the end of backward (TrAct's solve check; none when compiled)"
            if tract_layer and not args.torchcompile else ""),
        "evaluation": f"every {args.val_interval} epoch(s) and after the last",
        "mid-epoch checkpoints": (f"every {args.checkpoint_interval_updates} updates"
                                  if args.checkpoint_interval_updates else "off"),
    }


def read_log(path: Path) -> List[Dict]:
    """The complete JSON lines of a ``log.txt`` (a line cut short by a kill is left out)."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("epoch"), int)]


class RunLog:
    """Appends one JSON line per epoch to ``OUTPUT/log.txt`` and mirrors the numbers to TensorBoard in OUTPUT.

    ``resume_epoch``: the epochs done in the checkpoint the run continues from; later records are removed.
    """

    def __init__(self, output_dir: Path, enabled: bool = True, resume_epoch: Optional[int] = None):
        self.path = Path(output_dir) / "log.txt"
        self.writer = None
        self.records: List[Dict] = []
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.records = [r for r in read_log(self.path) if resume_epoch is None or r["epoch"] < resume_epoch]
            if resume_epoch is not None:
                tmp = self.path.with_name(".log.txt.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
                os.replace(tmp, self.path)
            self.writer = SummaryWriter(log_dir=str(output_dir), purge_step=resume_epoch)

    def has(self, epoch: int) -> bool:
        """Whether the record holds a line for ``epoch``."""
        return any(r["epoch"] == epoch for r in self.records)

    def write(self, stats: Dict[str, float], step: Optional[int] = None) -> None:
        """Log one epoch's stats; TensorBoard tags are ``train/loss``-style, at ``step`` (default: the epoch)."""
        if self.writer is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(stats) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(stats)
        step = stats["epoch"] if step is None else step
        for key, value in stats.items():
            if key != "epoch" and isinstance(value, (int, float)):
                split, _, name = key.partition("_")
                self.writer.add_scalar(f"{split}/{name}" if name else key, value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
