"""train.py in which one process of a launch gets a non-finite loss at one micro-batch (a helper of
tests/test_multiprocess.py, launched as the processes of a real multi-process run; not a test itself).

    accelerate launch --multi_gpu --num_processes 2 tests/one_rank_fails.py RANK MICRO_BATCH TRAIN_PY_ARGS...

Process RANK's loss is NaN at its MICRO_BATCH-th call of the criterion (1-based); the others' losses are untouched.
"""
import os
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


class NaNAt(nn.Module):
    """``criterion`` with the loss of its ``at``-th call multiplied by NaN (keeping the graph: backward runs)."""

    def __init__(self, criterion: nn.Module, at: int):
        super().__init__()
        self.criterion, self.at, self.calls = criterion, at, 0

    def forward(self, output, target):
        self.calls += 1
        loss = self.criterion(output, target)
        return loss * float("nan") if self.calls == self.at else loss


if __name__ == "__main__":
    rank, at = int(sys.argv[1]), int(sys.argv[2])
    if int(os.environ.get("RANK", "0")) == rank:
        build = train.build_criterion
        train.build_criterion = lambda *args, **kwargs: NaNAt(build(*args, **kwargs), at)
    train.cli(sys.argv[3:])
