"""The model contract.

A :class:`MultimodalModel` encodes each modality (Eq. 1), fuses the features and predicts (Eq. 2).
It declares its modalities, its per-modality parameters and the last layer of its fused head, so
no method ever has to find a modality's parameters by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..types import ModelOutput


class MultimodalModel(nn.Module):
    """Encoders per modality, a fusion module and a head.

    Subclasses (or :class:`LateFusionModel`) provide :meth:`encode` and :meth:`predict`.
    ``forward(inputs, masks)`` returns a :class:`~cggm.types.ModelOutput`.
    """

    modalities: tuple[str, ...]

    def encode(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> list[Tensor]:
        raise NotImplementedError

    def predict(self, features: Sequence[Tensor], masks: Sequence[Tensor | None] | None = None) -> Tensor:
        raise NotImplementedError

    @property
    def head_layer(self) -> nn.Module:
        """The fused head's last layer (``nn.Linear`` or a 1x1 ``nn.Conv2d``)."""
        raise NotImplementedError

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Each modality's encoder parameters (its input projection included)."""
        raise NotImplementedError

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every parameter that belongs to no single modality (fusion and head)."""
        owned = {id(p) for ps in self.modality_parameters().values() for p in ps}
        return [p for p in self.parameters() if id(p) not in owned]

    def modality_masks(self, masks: Mapping[str, Tensor] | None) -> list[Tensor | None] | None:
        if not masks:
            return None
        return [masks.get(m) for m in self.modalities]

    def check_inputs(self, inputs: Mapping[str, Tensor]) -> None:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(
                f"The batch lacks modalities {missing}; this model expects {list(self.modalities)} "
                f"and got {sorted(inputs)}."
            )
        sizes = {m: int(inputs[m].shape[0]) for m in self.modalities}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Modalities disagree on the batch size: {sizes}. Every modality needs one row per sample.")

    def forward(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None = None) -> ModelOutput:
        features = self.encode(inputs, masks)
        feature_masks = self.modality_masks(masks)
        prediction = self.predict(features, feature_masks)
        return ModelOutput(prediction=prediction, features=features, masks=feature_masks)


class LateFusionModel(MultimodalModel):
    """``encoders[m](x_m, mask_m) -> h_m``; ``fusion([h_1..h_M], masks) -> z``; ``head(z) -> y``.

    ``head_layer`` defaults to ``head.out`` (the :class:`~cggm.models.blocks.Head` output layer).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fusion: nn.Module,
        head: nn.Module,
        head_layer: nn.Module | None = None,
    ):
        super().__init__()
        if len(encoders) < 2:
            raise ValueError(f"A multimodal model needs at least 2 modalities, got {len(encoders)}: {list(encoders)}.")
        self.modalities = tuple(encoders)
        self.encoders = nn.ModuleDict(dict(encoders))
        self.fusion = fusion
        self.head = head
        self._head_layer_name = None if head_layer is None else _find_child_name(head, head_layer)

    def encode(self, inputs, masks=None):
        self.check_inputs(inputs)
        masks = masks or {}
        return [self.encoders[m](inputs[m], masks.get(m)) for m in self.modalities]

    def predict(self, features, masks=None):
        features = list(features)
        dtype = _autocast_dtype(features, self.head_layer.weight)
        if dtype is None:
            return self.head(self.fusion(features, masks))
        # features of lower precision than the head (bf16/fp16, made under an autocast that ended:
        # HF Accelerate autocasts only forward, and the methods call predict from their loss or
        # epoch hooks, OGM-GE, AGM, MSLR, Greedy): the head runs under the autocast they came from
        with torch.autocast(features[0].device.type, dtype=dtype):
            return self.head(self.fusion(features, masks))

    @property
    def head_layer(self) -> nn.Module:
        if self._head_layer_name is None:
            return self.head.out
        return self.head.get_submodule(self._head_layer_name)

    def modality_parameters(self):
        return {m: list(self.encoders[m].parameters()) for m in self.modalities}


def _find_child_name(parent: nn.Module, child: nn.Module) -> str:
    for name, mod in parent.named_modules():
        if mod is child:
            return name
    raise ValueError("head_layer must be a submodule of head.")


def head_layer_hidden(layer: nn.Module) -> int:
    """The input width of a head's last layer (what an auxiliary classifier must match)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Conv2d | nn.Conv1d | nn.Conv3d):
        return layer.in_channels
    raise TypeError(
        f"The head's last layer must be nn.Linear or nn.ConvNd to compare gradients with the classifiers; "
        f"got {type(layer).__name__}."
    )


def _autocast_dtype(features: Sequence[Tensor], weight: Tensor) -> torch.dtype | None:
    """The low-precision dtype of ``features`` when ``weight`` is of higher precision and no autocast
    is active on their device (``None``: run as is)."""
    low = next((h.dtype for h in features if h.dtype in (torch.float16, torch.bfloat16)), None)
    if low is None or weight.dtype == low or not weight.is_floating_point():
        return None
    if torch.is_autocast_enabled(features[0].device.type):
        return None
    return low
