"""Reference models and the model contract."""

from . import paper, resnet  # noqa: F401,E402  (registers "paper_transformer", "paper_seg" and "resnet18")
from .base import LateFusionModel, MultimodalModel, head_layer_hidden
from .blocks import ConcatFusion, Head, MLPEncoder, SequenceEncoder, TokenFusion, pool
from .classifiers import MapClassifier, SequenceClassifier, VectorClassifier, build_classifier
from .factory import build_model

__all__ = [
    "ConcatFusion", "Head", "LateFusionModel", "MLPEncoder", "MapClassifier", "MultimodalModel",
    "SequenceClassifier", "SequenceEncoder", "TokenFusion", "VectorClassifier", "build_classifier",
    "build_model", "head_layer_hidden", "pool",
]
