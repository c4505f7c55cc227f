"""painn-export: an exportable, scatter-free PaiNN for OCP/fairchem checkpoints.

Heavy optional libraries (onnxruntime, tensorrt, torch_scatter, ase) are
imported only by the functions that need them.
"""

from painn_export.checkpoint import CheckpointError, load_checkpoint, load_model, save_model
from painn_export.config import PaiNNConfig, TargetNormalization
from painn_export.model import CONTRACT_VERSION, INPUT_NAMES, OUTPUT_NAMES, PaiNN

__version__ = "0.1.0"

__all__ = [
    "CONTRACT_VERSION",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "CheckpointError",
    "PaiNN",
    "PaiNNConfig",
    "TargetNormalization",
    "__version__",
    "load_checkpoint",
    "load_model",
    "save_model",
]
