"""The global batch kept by train.py itself: ``--global-batch N`` over the processes a launch actually has.

A recipe's batch is a global number (DeiT III: 2048 images per optimizer update), while a launch decides how many
processes share it. With ``--global-batch N``, ``--batch-size`` is the most images one process holds at once, and the
per-process batch and accumulation steps are derived: the fewest accumulation steps ``a`` such that
``N = per-process batch x processes x a`` exactly, with the per-process batch at most ``--batch-size``. A process count
that does not divide N is refused, naming the layouts that do reach it. Nothing here imports torch: the command line
is checked before the seconds that importing it takes.
"""
import os
from typing import List, Optional, Tuple

__all__ = ["launched_processes", "batch_layout", "reachable_layouts", "describe_global_batch"]


def launched_processes() -> int:
    """How many processes the launcher started (torchrun's and accelerate launch's WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_layout(global_batch: int, max_per_process: int, processes: int) -> Optional[Tuple[int, int]]:
    """(per-process batch, accumulation steps) that reach ``global_batch`` exactly with the fewest accumulation steps
    and at most ``max_per_process`` images per process; None when ``processes`` does not divide ``global_batch``."""
    if global_batch % processes:
        return None
    per_process = global_batch // processes
    steps = next(a for a in range(1, per_process + 1) if per_process % a == 0 and per_process // a <= max_per_process)
    return per_process // steps, steps


def reachable_layouts(global_batch: int, max_per_process: int, processes: int, count: int = 4) -> List[str]:
    """Up to ``count`` process counts near ``processes`` that reach ``global_batch``, each as 'P processes: B x A'."""
    divisors = [p for p in range(1, global_batch + 1) if global_batch % p == 0]
    nearest = sorted(sorted(divisors, key=lambda p: (abs(p - processes), p))[:count])
    layouts = []
    for p in nearest:
        batch, steps = batch_layout(global_batch, max_per_process, p)
        layouts.append(f"{p} process{'es' if p > 1 else ''}: {batch} per process x {steps} "
                       f"step{'s' if steps > 1 else ''}")
    return layouts


def describe_global_batch(global_batch: Optional[int], batch_size: int, processes: int, accum_steps: int) -> str:
    """The dry run's line: the global batch and how it is made, e.g. '2048 = 256 per process x 4 processes x 2
    accumulation steps (--global-batch 2048)'."""
    total = batch_size * processes * accum_steps
    made = (f"{total} = {batch_size} per process x {processes} process{'es' if processes > 1 else ''} x "
            f"{accum_steps} accumulation step{'s' if accum_steps > 1 else ''}")
    if global_batch:
        return f"{made} (--global-batch {global_batch}: the steps derived from the processes launched)"
    return f"{made} (--batch-size x processes x --accum-steps; --global-batch N keeps N on any launch)"
