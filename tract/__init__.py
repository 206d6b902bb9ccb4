"""TrAct: trainable first-layer pre-activations (NeurIPS 2024) for PyTorch. Importing it needs torch only."""
from tract.method import TrAct, apply_tract, find_first_layer, remove_tract

__version__ = "0.1.0"

__all__ = ["TrAct", "apply_tract", "remove_tract", "find_first_layer", "__version__"]
