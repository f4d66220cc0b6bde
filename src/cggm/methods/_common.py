"""Small pieces shared by the comparison methods: per-modality unimodal heads (a declared
:class:`~cggm.methods.state.AuxModules`), unimodal predictions by zeroing the other modalities'
features, and tensor helpers.

Nothing here looks parameters up by name: modalities' parameters come from
``model.modality_parameters()``, unimodal logits from method-owned heads or ``model.predict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models.blocks import pool
from ..types import ModelOutput
from .base import Method, UnsupportedSettingError
from .state import AuxModules


class UniHead(nn.Module):
    """A linear unimodal head on one modality's features: pooled ``[B, D]`` / ``[B, T, D]`` ->
    ``[B, C]`` (Linear), or maps ``[B, D, h, w]`` -> ``[B, C, H, W]`` (1x1 conv, bilinear resize)."""

    def __init__(self, feature: Tensor, num_outputs: int):
        super().__init__()
        if feature.ndim in (2, 3):
            self.map = False
            self.layer = nn.Linear(feature.shape[-1], num_outputs)
        elif feature.ndim == 4:
            self.map = True
            self.layer = nn.Conv2d(feature.shape[1], num_outputs, 1)
        else:
            raise UnsupportedSettingError(f"No unimodal head for features of shape {tuple(feature.shape)}.")
        # fp32 master weights whatever the features' dtype (bf16 / fp16 under autocast): autocast
        # runs the layer in low precision, the optimizer updates fp32 weights
        self.to(device=feature.device)

    def forward(self, h: Tensor, mask: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        dtype = self.layer.weight.dtype
        if not self.map:
            return self.layer(pool(h, mask).to(dtype))
        out = self.layer(h.to(dtype))
        if size is not None and tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


class HeadMethod(Method):
    """Base for methods with one method-owned unimodal head per modality: the state ``heads``, an
    :class:`~cggm.methods.state.AuxModules` of ``head(feature, num_outputs)`` modules (default
    :class:`UniHead`), built on the first batch and trained by their own Adam optimizer
    (``head_lr``), stepped when the model's step is taken. Whether their loss reaches the encoders
    is up to the subclass (it passes detached or live features to :meth:`uni_logits`).
    """

    def __init__(self, head_lr: float = 1e-3, head_weight_decay: float = 0.0,
                 head: Callable[[Tensor, int], nn.Module] = UniHead) -> None:
        super().__init__()
        self.add_state("heads", AuxModules(lambda h, i: head(h, self.task.num_outputs), optimizer="adam",
                                           lr=head_lr, weight_decay=head_weight_decay, fused=False, scaled=True))

    def target_size(self, target: Tensor) -> tuple[int, int] | None:
        return self.task.target_size(target)

    def uni_logits(self, out: ModelOutput, target: Tensor, detach: bool = False) -> list[Tensor]:
        """Each head's prediction on its modality's features (detached features if ``detach``)."""
        heads = self.heads.ensure(out.features)
        heads.train(self.model.training if self.model is not None else True)
        size = self.target_size(target)
        return [head(h.detach() if detach else h, out.mask(i), size) for i, (head, h) in enumerate(zip(heads, out.features))]

    def eval_logits(self, out: ModelOutput) -> list[Tensor]:
        heads = self.heads.ensure(out.features)
        heads.eval()
        return [head(h, out.mask(i)) for i, (head, h) in enumerate(zip(heads, out.features))]


def predict_only(model: nn.Module, features: Sequence[Tensor], masks, keep) -> Tensor:
    """``model.predict`` with the features of every modality not in ``keep`` (indices) zeroed."""
    keep = set(keep)
    feats = [h if i in keep else torch.zeros_like(h) for i, h in enumerate(features)]
    return model.predict(feats, masks)


def true_class_prob(logits: Tensor, target: Tensor) -> Tensor:
    """Softmax probability of the true class, per sample: ``[B]``."""
    return logits.float().softmax(dim=1).gather(1, target.long().unsqueeze(1)).squeeze(1)


def others_mean(x: Tensor) -> Tensor:
    """For a ``[M]`` vector, the mean over the other entries of each entry."""
    m = x.shape[0]
    return (x.sum() - x) / (m - 1)


def in_window(epoch: int, start: int, end: int | None) -> bool:
    return epoch >= start and (end is None or epoch <= end)


def epoch_losses(ctx, split: str, fn) -> Tensor:
    """Mean over ``split`` of ``fn(out, target) -> [K]`` per-batch mean losses, weighted by batch
    size (no gradients; the model is put in eval mode and restored)."""
    model = ctx.model
    was_training = model.training
    model.eval()
    total, n = None, 0
    try:
        with torch.no_grad():
            for inputs, masks, target in ctx.batches(split):
                out = ctx.forward(inputs, masks)
                vals = fn(out, target) * target.shape[0]
                total = vals if total is None else total + vals
                n += int(target.shape[0])
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError(f"The {split!r} split yields no batch.")
    return total / n
