"""TrAct: trainable first-layer pre-activations (NeurIPS 2024) for PyTorch. Importing it needs torch only.

The method's names are loaded from ``tract.method`` on first use, so that importing a module of the package (the
scripts' command line, ``tract.config``) does not import torch: a bad command line is told in well under a second.
"""
from importlib import import_module

__version__ = "0.1.0"

__all__ = ["TrAct", "apply_tract", "remove_tract", "find_first_layer", "__version__"]


def __getattr__(name: str):
    """``tract.TrAct`` and the other names of the method, imported from ``tract.method`` when first asked for."""
    if name in ("TrAct", "apply_tract", "remove_tract", "find_first_layer"):
        return getattr(import_module("tract.method"), name)
    raise AttributeError(f"module 'tract' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
