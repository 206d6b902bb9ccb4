"""Process setup: the Accelerator (precision, process-group timeout, CUDA speed flags), data-loader workers,
preemption signals, and how the scripts end on a user error.

Preemption contract (SLURM's ``--signal``, ``scancel --signal``, a cluster's SIGTERM before a kill): on SIGUSR1 or
SIGTERM a process only raises a flag. The training loop asks ``should_stop`` after every optimizer update; in a
multi-process run the processes agree by one all-reduce, and read its result on the host, only every ``interval``
updates (``--sync-interval``), so that they stop after the same update without a device sync per update; a
single process stops after the next update. train.py then writes the ``last`` checkpoint (with the position inside
the epoch) and exits with status 75 (EX_TEMPFAIL: "requeue me"). ``--resume`` continues from that update.
"""
import argparse
import hashlib
import os
import signal
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from tract.config import ConfigError, first_process_on_machine
from tract.data import DatasetError
from tract.weights import WeightsError

__all__ = ["EXIT_REQUEUE", "requested_precision", "check_precision", "set_cuda_speed_flags", "build_accelerator",
           "default_num_workers",
           "Preemption", "run_cli"]

EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h


def requested_precision(args: argparse.Namespace) -> str:
    """The precision this run will use: --mixed-precision, else the launcher's (accelerate config / env)."""
    return args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def check_precision(precision: str) -> None:
    """Refuse bf16 on a GPU that has none (compute capability < 8.0, e.g. V100) with the fix in the message."""
    if precision != "bf16" or not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU"):
        return
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        name = torch.cuda.get_device_name()
        raise ConfigError(f"bf16 was asked for, but {name} (compute capability {major}.{minor}) has no bf16: "
                          "use --mixed-precision fp16 (the *_v100x8.yaml configs do)")


def set_cuda_speed_flags(tf32: bool, cudnn_benchmark: bool) -> None:
    """timm's train.py settings: TF32 float32 matmuls/convolutions, cuDNN autotuning (no-ops without CUDA)."""
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def build_accelerator(args: argparse.Namespace):
    """Create the Accelerator: gradient accumulation, the process-group timeout, and precision only if asked.

    An explicit mixed_precision would override the launcher's setting, so it is passed only when the user set one.
    On CUDA, TF32 and cuDNN autotuning are set as ``--tf32`` / ``--cudnn-benchmark`` say.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    check_precision(requested_precision(args))
    if torch.cuda.is_available():
        set_cuda_speed_flags(args.tf32, args.cudnn_benchmark)
    kwargs = {"mixed_precision": args.mixed_precision} if args.mixed_precision else {}
    # Generous: while rank 0 alone evaluates or saves, the other ranks wait in a collective.
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=args.dist_timeout))
    return Accelerator(gradient_accumulation_steps=args.accum_steps, kwargs_handlers=[timeout], **kwargs)


def default_num_workers() -> int:
    """DeiT's 10 loader workers per process, fewer when this machine's CPUs are shared by more processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(10, per_process))


class Preemption:
    """Turns SIGUSR1/SIGTERM into a flag that all processes agree on at the same optimizer update.

    ``interval``: in a multi-process run the agreement (an all-reduce and a host read) happens at updates that are
    multiples of it, or whenever ``should_stop`` is asked without an update number.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, interval: int = 1):
        self.requested = False
        self.interval = interval
        self._previous = {}

    def install(self) -> "Preemption":
        """Start catching the signals (main thread only, as Python requires)."""
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, accelerator, update: Optional[int] = None) -> bool:
        """True on every process once any process got a signal: one tiny all-reduce when distributed, made only at
        ``update``s that are multiples of ``interval`` (the same updates on every process) or when ``update`` is None.
        """
        if accelerator.num_processes == 1:
            return self.requested
        if update is not None and update % self.interval:
            return False
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _first_to_tell(message: str) -> bool:
    """Whether this process prints ``message``: the first process of this machine's launch to meet it.

    Every process of a launch meets a bad option, so it is told once per machine; an error only some processes meet
    (a bad image in one process's shard) is told by the process that met it. The processes of one launch on one
    machine share their parent (the launcher) and agree through an exclusively created file in the temp folder.
    """
    if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) <= 1:
        return True
    launch = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}-{os.getppid()}"
    digest = hashlib.sha256(f"{launch}\n{message}".encode()).hexdigest()[:24]
    try:
        os.close(os.open(Path(tempfile.gettempdir()) / f"tract-told-{digest}", os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    except OSError:  # no writable temp folder: the first process of the machine speaks for all
        return first_process_on_machine()
    return True


def run_cli(main: Callable[[Optional[Sequence[str]]], None], prog: str, argv: Optional[Sequence[str]] = None) -> None:
    """Run a script's ``main``: a user error or a diverged run ends with one message and exit status 1, no traceback.

    The message is printed once per machine by the first process that meets it (``_first_to_tell``); every other
    process of the launch that meets it exits with status 1 too.
    """
    try:
        main(argv)
    except (ConfigError, DatasetError, WeightsError, FloatingPointError) as e:
        message = f"{prog}: {'' if isinstance(e, FloatingPointError) else 'error: '}{e}"
        raise SystemExit(message if _first_to_tell(message) else 1) from None
