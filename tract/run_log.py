"""The per-epoch record of a run: DeiT's ``log.txt`` (one JSON line per epoch) and TensorBoard scalars.

A resumed run continues the record from its checkpoint: lines of the epochs the checkpoint does not hold are dropped
(a torn last line too) and TensorBoard's events from that epoch on are purged, so the record and the checkpoint agree
whatever point a kill came at.
"""
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

from tract.safe_files import append_text, read_bytes, write_atomic, write_failed

__all__ = ["RunLog", "read_log", "MAX_LOG_BYTES"]

MAX_LOG_BYTES = 1 << 26  # a line per epoch: a few hundred KB for the longest recipes


def read_log(path: Path) -> List[Dict]:
    """The complete JSON lines of a ``log.txt`` (a line cut short by a kill is left out); a log that is a link or
    beyond MAX_LOG_BYTES is refused."""
    records = []
    if os.path.lexists(path):
        for line in read_bytes(Path(path), MAX_LOG_BYTES).decode(errors="replace").splitlines():
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
                try:
                    write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())
                except OSError as e:
                    raise write_failed(self.path, e, self.path.parent) from None
            self.writer = SummaryWriter(log_dir=str(output_dir), purge_step=resume_epoch)

    def has(self, epoch: int) -> bool:
        """Whether the record holds a line for ``epoch``."""
        return any(r["epoch"] == epoch for r in self.records)

    def write(self, stats: Dict[str, float], step: Optional[int] = None) -> None:
        """Log one epoch's stats; TensorBoard tags are ``train/loss``-style, at ``step`` (default: the epoch)."""
        if self.writer is None:
            return
        from tract.run_folder import check_still_held

        check_still_held(self.path.parent)
        try:
            append_text(self.path, json.dumps(stats) + "\n")
        except OSError as e:
            check_still_held(self.path.parent)  # the folder deleted during the write: that is the message
            raise write_failed(self.path, e, self.path.parent) from None
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
