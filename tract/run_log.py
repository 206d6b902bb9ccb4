"""The per-epoch record of a run: DeiT's ``log.txt`` (one JSON line per epoch) and TensorBoard scalars."""
import json
from pathlib import Path
from typing import Dict, Optional

__all__ = ["RunLog"]


class RunLog:
    """Appends one JSON line per epoch to ``OUTPUT/log.txt`` and mirrors the numbers to TensorBoard in OUTPUT."""

    def __init__(self, output_dir: Path, enabled: bool = True):
        self.path = Path(output_dir) / "log.txt"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir))

    def write(self, stats: Dict[str, float], step: Optional[int] = None) -> None:
        """Log one epoch's stats; TensorBoard tags are ``train/loss``-style, at ``step`` (default: the epoch)."""
        if self.writer is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(stats) + "\n")
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
