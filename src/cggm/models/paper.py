"""Reference architectures close to the CGGM paper's (registered with :func:`register_model`).

``paper_transformer`` (UPMC-Food-101, CMU-MOSI/MOSEI, IEMOCAP): per modality, a MulT-style
transformer encoder whose Conv1d input projection lives inside the encoder (so CGGM's magnitude
factor scales it with its modality, unlike the official code, cggm-spec.md A4/A10), then a
transformer fusion over the concatenated tokens of all modalities read out at a learned prediction
token, then a residual MLP head. Padding masks are honoured everywhere. It is the library's
``transformer`` model with the paper's defaults (d_model 40, 5 heads, fusion = encoder depth - 2);
the presets set the per-dataset depth and dropouts (spec 2.3-2.4).

``paper_seg`` (BraTS): per MRI sequence a small 2D conv encoder (``[B, 1, H, W] ->
[B, 4*width, H/4, W/4]``), a convolutional fusion of the concatenated maps, and a decoder that
upsamples to ``[B, 4, H, W]`` logits through a final 1x1 conv (``head_layer``). The decoder uses
the fused map only (no per-modality skip connections), so each encoder's gradient flows only
through its feature map and CGGM's modulation of that gradient is complete; the per-modality
feature maps ``[B, C, h, w]`` are what CGGM's light decoders (``MapClassifier``) classify. This
replaces the paper's four ResNet-101 DeepLab-v3+ encoders with a CPU-friendly network; raise
``width`` for capacity.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..types import Task
from .base import LateFusionModel, MultimodalModel
from .factory import register_model, transformer_token


@register_model("paper_transformer")
def paper_transformer(input_shapes, task: Task, d_model: int = 40, heads: int = 5, encoder_layers: int = 4,
                      fusion_layers: int | None = None, dropout: float = 0.15, embed_dropout: float = 0.2,
                      head_dropout: float = 0.1, attention: Literal["fast", "reference"] = "fast") -> MultimodalModel:
    """Per-modality MulT-style encoders, prediction-token transformer fusion, residual head.
    ``fusion_layers`` defaults to ``encoder_layers - 2`` (at least 1), as in the official code.
    ``attention``: the encoder layers' implementation, ``"fast"`` or torch's ``"reference"``
    (same parameters and function; see :func:`cggm.models.factory.transformer_token`)."""
    if fusion_layers is None:
        fusion_layers = max(1, encoder_layers - 2)
    return transformer_token(input_shapes, task, d_model=d_model, heads=heads, encoder_layers=encoder_layers,
                             fusion_layers=fusion_layers, dropout=dropout, embed_dropout=embed_dropout,
                             head_dropout=head_dropout, attention=attention)


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvEncoder(nn.Module):
    """``[B, in_ch, H, W] -> [B, 4*width, ceil(H/4), ceil(W/4)]``: two stride-2 stages and a
    dilated context block."""

    def __init__(self, in_ch: int = 1, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            _conv(in_ch, width), _conv(width, width),
            _conv(width, 2 * width, stride=2), _conv(2 * width, 2 * width),
            _conv(2 * width, 4 * width, stride=2), _conv(4 * width, 4 * width, dilation=2),
            _conv(4 * width, 4 * width, dilation=4),
        )
        self.out_dim = 4 * width

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(x)


class ConvFusion(nn.Module):
    """Concatenate the modality maps along channels, then 1x1 and 3x3 conv blocks."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
                                 _conv(out_ch, out_ch))

    def forward(self, features: list[Tensor], masks=None) -> Tensor:
        return self.net(torch.cat(list(features), dim=1))


class SegDecoder(nn.Module):
    """Two x2 bilinear upsampling + conv stages, then ``out`` (1x1 conv to the classes)."""

    def __init__(self, in_ch: int, width: int, num_classes: int):
        super().__init__()
        self.up1 = _conv(in_ch, 4 * width)
        self.up2 = _conv(4 * width, 2 * width)
        self.out = nn.Conv2d(2 * width, num_classes, 1)
        self.size: tuple[int, int] | None = None

    def forward(self, z: Tensor) -> Tensor:
        z = self.up1(F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False))
        z = self.up2(F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False))
        logits = self.out(z)
        if self.size is not None and tuple(logits.shape[-2:]) != self.size:
            logits = F.interpolate(logits, size=self.size, mode="bilinear", align_corners=False)
        return logits


class SegmentationModel(LateFusionModel):
    """Late-fusion segmentation model whose logits have the input's spatial size."""

    def encode(self, inputs, masks=None):
        first = inputs[self.modalities[0]]
        self.head.size = tuple(int(s) for s in first.shape[-2:])
        return super().encode(inputs, masks)


@register_model("paper_seg")
def paper_seg(input_shapes, task: Task, width: int = 8, fusion_width: int | None = None) -> MultimodalModel:
    """Per-modality conv encoders, conv fusion and a decoder to ``[B, num_outputs, H, W]`` logits."""
    if not task.one_of(("segmentation",)):
        raise ValueError(f"paper_seg is a segmentation model, got a {task.kind} task.")
    encoders = {}
    for m, shape in input_shapes.items():
        if len(shape) != 3:
            raise ValueError(f"paper_seg needs [C, H, W] images; modality {m!r} has sample shape {shape}.")
        encoders[m] = ConvEncoder(int(shape[0]), width)
    fused = fusion_width or 8 * width
    fusion = ConvFusion(sum(e.out_dim for e in encoders.values()), fused)
    head = SegDecoder(fused, width, task.num_outputs)
    return SegmentationModel(encoders, fusion, head, head_layer=head.out)
