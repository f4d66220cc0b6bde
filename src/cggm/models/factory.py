"""Build a reference model by name from the dataset's input shapes (used by configs and the CLI)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

from ..types import Task
from .base import LateFusionModel, MultimodalModel
from .blocks import ConcatFusion, Head, MLPEncoder, SequenceEncoder, TokenFusion

ModelBuilder = Callable[..., MultimodalModel]
MODEL_BUILDERS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def deco(fn: ModelBuilder) -> ModelBuilder:
        MODEL_BUILDERS[name] = fn
        return fn

    return deco


# widths that are the size of a layer every input passes through: 0 would leave a model that sees
# no input (its prediction a constant bias) and trains without an error
SIZE_OPTIONS = ("feature_dim", "hidden", "d_model", "heads", "width")


def size_problems(options: Mapping[str, Any]) -> list[str]:
    """One message per option of ``SIZE_OPTIONS`` in ``options`` that is not a whole number >= 1."""
    return [f"{k} must be an integer >= 1 (the width of a layer every input passes through; 0 gives a model "
            f"that sees no input), got {v!r}" for k, v in options.items()
            if k in SIZE_OPTIONS and (isinstance(v, bool) or not isinstance(v, int) or v < 1)]


def build_model(arch: str, input_shapes: Mapping[str, tuple[int, ...]], task: Task, **kwargs: Any) -> MultimodalModel:
    """``input_shapes`` maps each modality to the shape of one sample (no batch axis)."""
    if arch not in MODEL_BUILDERS:
        raise ValueError(f"Unknown model architecture {arch!r}. Known: {sorted(MODEL_BUILDERS)}.")
    problems = size_problems(kwargs)
    if problems:
        raise ValueError(f"Bad options for model {arch!r}: " + "; ".join(problems) + ".")
    try:
        return MODEL_BUILDERS[arch](input_shapes=dict(input_shapes), task=task, **kwargs)
    except TypeError as err:
        raise TypeError(f"Bad options for model {arch!r}: {err}") from err


@register_model("mlp")
def mlp_concat(input_shapes, task: Task, feature_dim: int = 32, hidden: int = 64, encoder_layers: int = 2,
               head_hidden: int = 64, dropout: float = 0.0) -> MultimodalModel:
    """An MLP encoder per modality, concatenation fusion, a residual MLP head."""
    encoders = {
        m: MLPEncoder(_flat(shape), feature_dim, hidden, encoder_layers, dropout) for m, shape in input_shapes.items()
    }
    return LateFusionModel(encoders, ConcatFusion(), Head(feature_dim * len(encoders), task.num_outputs, head_hidden,
                                                         dropout))


@register_model("transformer")
def transformer_token(input_shapes, task: Task, d_model: int = 40, heads: int = 5, encoder_layers: int = 2,
                      fusion_layers: int = 2, dropout: float = 0.1, embed_dropout: float = 0.0,
                      head_dropout: float = 0.0, attention: Literal["fast", "reference"] = "fast") -> MultimodalModel:
    """A transformer encoder per modality over its ``[T, D]`` sequence, and a transformer fusion over
    the concatenated tokens read out at a prediction token (the paper's design).

    ``attention``: ``"fast"`` (:mod:`cggm.models.fast`) or ``"reference"`` (torch's
    ``nn.TransformerEncoderLayer``); same parameters and function, state_dicts load both ways."""
    encoders = {}
    for m, shape in input_shapes.items():
        if len(shape) != 2:
            raise ValueError(f"The transformer model needs [T, D] sequences; modality {m!r} has sample shape {shape}.")
        encoders[m] = SequenceEncoder(shape[1], d_model, heads, encoder_layers, dropout, embed_dropout,
                                      attention=attention)
    fusion = TokenFusion(d_model, len(encoders), heads, fusion_layers, dropout, attention=attention)
    return LateFusionModel(encoders, fusion, Head(d_model, task.num_outputs, d_model, head_dropout))


def _flat(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
