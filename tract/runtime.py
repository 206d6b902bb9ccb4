"""Process setup: the Accelerator (precision, process-group timeout, CUDA speed flags), data-loader workers,
preemption signals, the main process deciding for all (``on_main``), and how the scripts end on a user error.

Preemption contract (SLURM's ``--signal``, ``scancel --signal``, a cluster's SIGTERM before a kill): on SIGUSR1 or
SIGTERM a process only raises a flag. The training loop asks ``should_stop`` after every optimizer update; in a
multi-process run the processes agree by one all-reduce, and read its result on the host, only every ``interval``
updates (``--sync-interval``), so that they stop after the same update without a device sync per update; a
single process stops after the next update. train.py then writes the ``last`` checkpoint (with the position inside
the epoch) and exits with status 75 (EX_TEMPFAIL: "requeue me"). ``--resume`` continues from that update. A first
Ctrl-C (SIGINT) does the same and exits 130; a second one stops at once. Before the first update (the start-up:
data, model, a checkpoint, a resumed epoch's evaluation) there is nothing to save, and a start-up can hang (a stalled
file system): a signal then ends the process at once, with the same status.
"""
import argparse
import os
import shlex
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence, Tuple

import torch

from tract.errors import ConfigError

__all__ = ["EXIT_REQUEUE", "EXIT_INTERRUPTED", "LEGACY_INDEX_URL", "requested_precision", "check_precision",
           "launched_for_gpus", "check_cuda", "check_world_size", "set_cuda_speed_flags", "build_accelerator",
           "cpu_launch", "default_num_workers", "StartUpStopped", "Preemption", "on_main"]

EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a program ended by Ctrl-C


def requested_precision(args: argparse.Namespace) -> str:
    """The precision this run will use: --mixed-precision, else the launcher's (accelerate config / env)."""
    return args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def check_precision(precision: str) -> None:
    """Refuse bf16 on a GPU that has none (compute capability < 8.0, e.g. V100) with the fix in the message."""
    if precision != "bf16" or not torch.cuda.is_available() or _truthy(os.environ.get("ACCELERATE_USE_CPU")):
        return
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        name = torch.cuda.get_device_name()
        raise ConfigError(f"bf16 was asked for, but {name} (compute capability {major}.{minor}) has no bf16: "
                          "use --mixed-precision fp16 (the *_v100x8.yaml configs do)")


# torch 2.14's PyPI wheel is a CUDA 13 build with kernels from sm_75 (Turing) on; its CUDA 12.6 build ("legacy", the
# last torch release to have one) still has sm_50-sm_70, and runs on older drivers.
LEGACY_INDEX_URL = "https://download.pytorch.org/whl/cu126"
_INSTALL_LEGACY = f"rm -rf .venv && TORCH_INDEX_URL={LEGACY_INDEX_URL} bash scripts/env.sh python train.py --dry-run"


def _truthy(value: Optional[str]) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _has_kernels(capability: Tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a torch built for ``arch_list`` (``torch.cuda.get_arch_list()``) runs on a GPU of ``capability``.

    Binary code for sm_XY runs on X.Z with Z >= Y; PTX (compute_XY) is compiled by the driver for any newer GPU.
    """
    for arch in arch_list:
        kind, _, number = arch.partition("_")
        digits = "".join(c for c in number if c.isdigit())
        if len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if (kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]) or \
                (kind == "compute" and built <= tuple(capability)):
            return True
    return False


def launched_for_gpus() -> Optional[str]:
    """The GPU mixed precision ``accelerate launch`` was configured with, when it started this process; else None.

    What a config reaches the processes with (accelerate 1.15): its ``mixed_precision`` always
    (ACCELERATE_MIXED_PRECISION), its ``use_cpu`` only through the one-process launcher (ACCELERATE_USE_CPU, which
    ``--cpu`` sets too); a multi-process launch is torchrun's, which hears of neither use_cpu nor the config file. So
    the precision tells the configs of launch/accelerate/ apart: each GPU config asks for bf16 or fp16, cpu.yaml for
    none. A launch with ``--cpu`` or ACCELERATE_USE_CPU=1 is not configured for GPUs, whatever its precision. What
    reaches the processes cannot tell cpu.yaml from ``--multi_gpu`` without a config or a GPU config overridden with
    ``--mixed_precision no``: those run on the CPU too where there is no GPU.
    """
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "no" or _truthy(os.environ.get("ACCELERATE_USE_CPU")):
        return None
    return precision


def _cpu_command() -> str:
    """This process's own command, launched with launch/accelerate/cpu.yaml."""
    config = Path(__file__).resolve().parents[1] / "launch" / "accelerate" / "cpu.yaml"
    if config.is_file() and config.is_relative_to(Path.cwd()):
        config = config.relative_to(Path.cwd())
    elif not config.is_file():  # an installed tract: the repository's file, named as docs/launch.md names it
        config = Path("launch/accelerate/cpu.yaml")
    return shlex.join(["accelerate", "launch", "--config_file", str(config), *sys.argv])


def check_cuda() -> None:
    """Refuse a GPU launch that cannot run, before anything is built, with the fix in the message.

    A launch configured for GPUs (``launched_for_gpus``) where torch finds no usable GPU (no GPU, or a driver older
    than this torch build needs): Accelerate would run each process on the CPU. A GPU whose architecture the installed
    torch has no kernels for (V100, sm_70, under torch's CUDA 13 wheels): the first kernel would fail.
    """
    if _truthy(os.environ.get("ACCELERATE_USE_CPU")):
        return
    if not torch.cuda.is_available():
        precision = launched_for_gpus()
        if precision:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            raise ConfigError(
                f"this launch is configured for GPUs ({world} process(es), mixed precision {precision}), but torch "
                f"{torch.__version__} (CUDA {torch.version.cuda or 'none'}) finds no usable GPU. Check `nvidia-smi`; "
                f"with an older driver (or a V100) install torch's CUDA 12.6 build: {_INSTALL_LEGACY} "
                f"(docs/launch.md, Installing for GPUs). To train on the CPU: {_cpu_command()}")
        return
    arch_list = torch.cuda.get_arch_list()
    for index in range(torch.cuda.device_count()):
        capability = torch.cuda.get_device_capability(index)
        if _has_kernels(capability, arch_list):
            continue
        name, sm = torch.cuda.get_device_name(index), f"sm_{capability[0]}{capability[1]}"
        fix = (f"install torch's CUDA 12.6 build, which has {sm}: {_INSTALL_LEGACY} (docs/launch.md, Installing for "
               "GPUs)"
               if capability < (7, 5) else
               f"install a torch build whose torch.cuda.get_arch_list() has {sm} (https://pytorch.org/get-started)")
        raise ConfigError(f"GPU {index}, {name} ({sm}), has no kernels in torch {torch.__version__}, which was built "
                          f"for {' '.join(arch_list) or 'no GPU'}: {fix}")


def check_world_size(accelerator) -> None:
    """Refuse a launch whose processes Accelerate does not see as one run (WORLD_SIZE processes started)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(f"the launcher started {launched} processes, but Accelerate runs {accelerator.num_processes} "
                          f"({accelerator.distributed_type}): each would train alone. Launch with `accelerate launch` "
                          "and a config of launch/accelerate/ whose processes match the GPUs, or with --cpu")


def set_cuda_speed_flags(tf32: bool, cudnn_benchmark: bool) -> None:
    """timm's train.py settings: TF32 float32 matmuls/convolutions, cuDNN autotuning (no-ops without CUDA)."""
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark


def build_accelerator(args: argparse.Namespace):
    """Create the Accelerator: gradient accumulation, the process-group timeout, and precision only if asked.

    An explicit mixed_precision would override the launcher's setting, so it is passed only when the user set one.
    On CUDA, TF32 and cuDNN autotuning are set as ``--tf32`` / ``--cudnn-benchmark`` say. A launch that cannot run
    on its GPUs, or whose processes Accelerate does not join into one run, is refused first (``check_cuda``,
    ``check_world_size``); a multi-process CPU launch (cpu.yaml) is made one (``cpu_launch``).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    check_cuda()
    cpu_launch()
    check_precision(requested_precision(args))
    if torch.cuda.is_available():
        set_cuda_speed_flags(args.tf32, args.cudnn_benchmark)
    kwargs = {"mixed_precision": args.mixed_precision} if args.mixed_precision else {}
    # Generous: while rank 0 alone evaluates or saves, the other ranks wait in a collective.
    timeout = InitProcessGroupKwargs(timeout=timedelta(minutes=args.dist_timeout))
    accelerator = Accelerator(gradient_accumulation_steps=args.accum_steps, kwargs_handlers=[timeout], **kwargs)
    check_world_size(accelerator)
    return accelerator


def on_main(accelerator, fn: Callable[[], Any]) -> Any:
    """fn() run on the main process only, its result given to every process; a ConfigError there is raised on every
    process, so all stop together."""
    from accelerate.utils import broadcast_object_list

    outcome = [None, None]  # result, error
    if accelerator.is_main_process:
        try:
            outcome[0] = fn()
        except ConfigError as e:
            outcome[1] = e
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def cpu_launch() -> bool:
    """Make a process of a multi-process CPU launch (launch/accelerate/cpu.yaml) run on the CPU; True if it did.

    ``accelerate launch`` starts the processes of a multi-process config through torchrun without passing its
    ``use_cpu`` on (accelerate 1.15), and Accelerate then turns a process without a GPU into a single process of
    rank 0. ``ACCELERATE_USE_CPU`` is what Accelerate's own one-process launcher sets for this. A launch configured
    for GPUs is never made one (``check_cuda`` refuses it).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ
    if launched and not torch.cuda.is_available() and not launched_for_gpus() and not _truthy(
            os.environ.get("ACCELERATE_USE_CPU")):
        os.environ["ACCELERATE_USE_CPU"] = "1"
        return True
    return False


def default_num_workers() -> int:
    """DeiT's 10 loader workers per process, fewer when this machine's CPUs are shared by more processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(10, per_process))


class StartUpStopped(BaseException):
    """A signal before the first optimizer update: the start-up stops where it is (a BaseException, so that no
    library's ``except Exception`` holds it up)."""


class Preemption:
    """Turns SIGUSR1/SIGTERM, and a first Ctrl-C (SIGINT), into a flag that all processes agree on at the same
    optimizer update; a second Ctrl-C stops at once (KeyboardInterrupt). Until :meth:`arm` (called before the first
    update) a signal raises StartUpStopped at once instead: nothing is trained yet, and a hung start-up must end.

    ``interval``: in a multi-process run the agreement (an all-reduce and a host read) happens at updates that are
    multiples of it, or whenever ``should_stop`` is asked without an update number. ``exit_code`` is the status the
    script exits with once stopped: 75 ("requeue me") for a cluster's signal, 130 (128 + SIGINT, the shell's) for
    Ctrl-C.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, interval: int = 1):
        self.requested = False
        self.received: Optional[int] = None  # the first signal
        self.interval = interval
        self.armed = False
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
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the checkpoint
        if self.received is None:
            self.received = signum
        self.requested = True
        if not self.armed:
            raise StartUpStopped

    def arm(self) -> None:
        """Training starts: from here on a signal only raises the flag, and the loop stops after an update."""
        self.armed = True

    @property
    def interrupted(self) -> bool:
        """Whether the stop was asked for by Ctrl-C (SIGINT) rather than by a cluster's signal."""
        return self.received == signal.SIGINT

    @property
    def exit_code(self) -> int:
        """The exit status once stopped: EXIT_REQUEUE for SIGUSR1/SIGTERM, 130 for Ctrl-C."""
        return EXIT_INTERRUPTED if self.interrupted else EXIT_REQUEUE

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

    def stop(self, where: str, output_dir, log: Callable[[str], None] = print) -> NoReturn:
        """Say where the run stopped and how to continue it (``output_dir`` None: nothing was written), then exit with
        ``exit_code``."""
        how = (f"resume with --resume {output_dir}, e.g. python train.py --resume {output_dir}" if output_dir else
               "nothing was written: rerun the command")
        log(f"{'interrupted' if self.interrupted else 'preempted'} {where}: exiting with {self.exit_code} ({how})")
        raise SystemExit(self.exit_code)
