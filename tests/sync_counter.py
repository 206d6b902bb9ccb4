"""train.py with a count of the collectives and device->host reads each call of train_one_epoch makes (a helper of
tests/test_speed.py, launched as one process of a real multi-process run; not a test itself).

    accelerate launch --multi_gpu --num_processes 2 tests/sync_counter.py COUNTS_DIR TRAIN_PY_ARGS...

Counted: the torch.distributed collectives called from Python (DDP's gradient all-reduce runs in its C++ reducer and
reads nothing back), Tensor.item / tolist / bool / float / int (device->host reads) and torch.tensor / as_tensor /
Tensor.new_tensor (tensors made from host values: on a GPU, host->device copies), except in the loading of images,
which a GPU run does in the loader workers on host tensors (here, with --num-workers 0, in the process itself). Each
process writes COUNTS_DIR/rank-<r>.json: one {"collectives": n, "reads": n, "copies": n} per epoch.
"""
import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data._utils.fetch import _MapDatasetFetcher

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter_tensor",
               "all_to_all", "barrier")
READS = ("item", "tolist", "__bool__", "__float__", "__int__")
COPIES = ("tensor", "as_tensor")  # of torch; and Tensor.new_tensor
epochs = []  # one dict of counts per call of train_one_epoch
counting = [False]


def counted(fn, key):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if counting[0]:
            epochs[-1][key] += 1
        return fn(*args, **kwargs)
    return wrapper


def train_one_epoch(*args, **kwargs):
    epochs.append({"collectives": 0, "reads": 0, "copies": 0})
    counting[0] = True
    try:
        return original(*args, **kwargs)
    finally:
        counting[0] = False
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(epochs))


def not_counted(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was, counting[0] = counting[0], False
        try:
            return fn(*args, **kwargs)
        finally:
            counting[0] = was
    return wrapper


if __name__ == "__main__":
    out = Path(sys.argv[1])
    _MapDatasetFetcher.fetch = not_counted(_MapDatasetFetcher.fetch)  # a batch's loading: its items, then collate
    for name in COLLECTIVES:
        setattr(dist, name, counted(getattr(dist, name), "collectives"))
    for name in READS:
        setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), "reads"))
    for name in COPIES:
        setattr(torch, name, counted(getattr(torch, name), "copies"))
    torch.Tensor.new_tensor = counted(torch.Tensor.new_tensor, "copies")
    original = train.train_one_epoch
    train.train_one_epoch = train_one_epoch
    train.main(sys.argv[2:])
