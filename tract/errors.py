"""The user errors of every module, and how a script tells them: a bad option, dataset or weights file as one
message, once per machine (``run_cli``).

At the bottom of the package, importing nothing of it (nor torch), so that any module can raise them and the scripts
can read their command line and tell its errors before the seconds that importing torch and timm takes.
"""
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

__all__ = ["ConfigError", "DatasetError", "WeightsError", "first_process_on_machine", "run_cli"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad option value or config file: the message names the problem and the fix."""


class DatasetError(ValueError):
    """A dataset that is missing or laid out wrongly: the message names the root, the expected layout and the fix."""

    _WORKER = "Caught DatasetError in DataLoader worker"

    def __init__(self, message: str = ""):
        # Raised in a loader worker, the error comes back as "Caught DatasetError in ... Original Traceback ...":
        # keep the message alone, so the user sees one line, not a worker's traceback.
        if message.startswith(self._WORKER) and "DatasetError: " in message:
            message = message.rsplit("DatasetError: ", 1)[1].strip()
        super().__init__(message)


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the message names the problem and the fix."""


def first_process_on_machine() -> bool:
    """Whether this process tells the user about a bad option: the first of each machine's launch, or the only one."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


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


def run_cli(main: Callable[..., T], prog: str, argv: Optional[Sequence[str]] = None, /, **kwargs: Any) -> T:
    """Run a script's ``main(argv, **kwargs)`` (or its parser) and return what it returns: a user error or a diverged
    run ends with one message and exit status 1, no traceback.

    The message is printed once per machine by the first process that meets it (``_first_to_tell``); every other
    process of the launch that meets it exits with status 1 too.
    """
    try:
        return main(argv, **kwargs)
    except (ConfigError, DatasetError, WeightsError, FloatingPointError) as e:
        message = f"{prog}: {'' if isinstance(e, FloatingPointError) else 'error: '}{e}"
        raise SystemExit(message if _first_to_tell(message) else 1) from None
