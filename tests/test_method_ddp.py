"""TrAct under a real 2-process DistributedDataParallel run (gloo, CPU): per-process Gram by default, the Gram of
all processes' rows with sync_gram=True, each checked against the float64 math computed here, for standardised
inputs (float32 solve) and raw pixel values (float64 solve, decided alike by both processes from the synced Gram)."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tract import apply_tract

LAM = 0.1
BATCH = {0: 3, 1: 5}  # unequal local batches: the synced Gram must weight every row, not every process, equally
SCALES = {"standardised": (1.0, 0.0), "pixels": (64.0, 128.0)}  # x = randn * scale + shift


def _data(rank: int, inputs: str):
    g = torch.Generator().manual_seed(100 + rank)
    scale, shift = SCALES[inputs]
    x = torch.randn(BATCH[rank], 3, 8, 8, generator=g) * scale + shift
    return x, torch.randn(BATCH[rank], 4, 4, 4, generator=g)


def _make_model(sync_gram: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 2, stride=2))
    apply_tract(model, lam=LAM, sync_gram=sync_gram)
    return model


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A file store: no port to find free and then race for
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    try:
        for inputs in SCALES:
            x, grad_z = _data(rank, inputs)
            for sync in (False, True):
                model = nn.parallel.DistributedDataParallel(_make_model(sync))
                for _ in range(2):  # the first backward decides the dtype, the second uses it
                    model.zero_grad()
                    model(x).backward(grad_z)
                torch.save(model.module[0].weight.grad,
                           os.path.join(out_dir, f"grad_{inputs}_sync{int(sync)}_rank{rank}.pt"))
        dist.barrier()  # neither process tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Everything is saved; skip the interpreter's C++ teardown, where gloo's threads sometimes abort the process
    # ("terminate called without an active exception", no Python frame: about 1 run in 5 on a loaded 2-core machine).
    os._exit(0)


def _rows_and_grad(rank: int, inputs: str):
    """(X, ordinary weight grad) of one process in float64, by patch reshape (2x2, stride 2)."""
    x, grad_z = (t.double() for t in _data(rank, inputs))
    rows = x.reshape(-1, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(-1, 12)
    gz = grad_z.permute(0, 2, 3, 1).reshape(-1, 4)
    return rows, (gz.T @ rows)


def test_ddp_per_process_gram_and_sync_gram(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for inputs in SCALES:
        _check(tmp_path, inputs)


def _check(tmp_path, inputs: str) -> None:
    eye = torch.eye(12, dtype=torch.float64)
    parts = [_rows_and_grad(r, inputs) for r in (0, 1)]

    # Default (the paper): each process preconditions with its own Gram, then DDP averages the gradients.
    local = [gw @ torch.linalg.inv(rows.T @ rows / rows.shape[0] + LAM * eye) for rows, gw in parts]
    expected_local = ((local[0] + local[1]) / 2).reshape(4, 3, 2, 2)
    # sync_gram: one Gram over the rows of both processes.
    rows_all = torch.cat([rows for rows, _ in parts])
    gram_all = rows_all.T @ rows_all / rows_all.shape[0] + LAM * eye
    expected_sync = ((parts[0][1] + parts[1][1]) / 2 @ torch.linalg.inv(gram_all)).reshape(4, 3, 2, 2)
    assert (expected_sync - expected_local).abs().max() > 1e-3  # the two modes really differ on this data

    for sync, expected in ((0, expected_local), (1, expected_sync)):
        grads = [torch.load(tmp_path / f"grad_{inputs}_sync{sync}_rank{r}.pt") for r in (0, 1)]
        assert torch.equal(grads[0], grads[1])  # DDP leaves both processes with the same gradient
        torch.testing.assert_close(grads[0].double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
