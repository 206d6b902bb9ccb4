"""The user errors of every module: a bad option, dataset or weights file told as one message (``runtime.run_cli``).

At the bottom of the package, importing nothing of it, so that any module can raise them and the scripts can catch
them without importing the modules that raise them.
"""

__all__ = ["ConfigError", "DatasetError", "WeightsError"]


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
