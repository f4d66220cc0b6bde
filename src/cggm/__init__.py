"""cggm: Classifier-guided Gradient Modulation and other balanced multimodal learning methods."""

from .methods import CGGM, EpochContext, Method, ProtocolError, build_method, list_methods
from .models import LateFusionModel, MultimodalModel, build_model
from .types import ModelOutput, Task

__version__ = "0.1.0"

__all__ = [
    "CGGM", "EpochContext", "LateFusionModel", "Method", "ModelOutput", "MultimodalModel", "ProtocolError", "Task",
    "build_method", "build_model", "list_methods",
]
