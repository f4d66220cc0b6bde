"""ResNet-18 encoders for the audio-visual benchmarks (registered as ``resnet18``).

The protocol of OGM-GE (CVPR 2022) and the methods compared on CREMA-D, Kinetics-Sounds and AVE:
one ResNet-18 per modality, trained from scratch, late fusion by concatenation, one linear layer.

* :class:`ResNet18`: ``[N, C_in, H, W] -> [N, 8*width, H/32, W/32]`` (He et al., CVPR 2016:
  a 7x7 stride-2 stem, 3x3 max pool, four stages of two basic blocks with 1x1 projection
  shortcuts; ``width`` 64 is the standard network, smaller widths for quick runs). ``C_in`` is 1
  for spectrograms and 3 for RGB frames.
* a modality whose samples are ``[C, H, W]`` (a spectrogram ``[1, F, T]``) is encoded and
  average-pooled: ``[B, 8*width]``;
* a modality whose samples are ``[T, C, H, W]`` (``T`` frames) has time folded into the batch
  (``[B*T, C, H, W]``), each frame encoded by the same network, and the maps average-pooled over
  time and space (OGM-GE's ``adaptive_avg_pool3d``): ``[B, 8*width]``;
* the fused head is :class:`LinearHead` (its ``out`` is CGGM's head layer) over the concatenated
  features.

Initialisation as OGM-GE's ``weight_init``: Kaiming-normal (fan out) convolutions, BatchNorm
weight 1 and bias 0, Xavier-normal linear weights with zero bias.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..types import Task
from .base import LateFusionModel, MultimodalModel
from .blocks import ConcatFusion
from .factory import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet18(nn.Module):
    """``[N, in_channels, H, W] -> [N, 8*width, H', W']`` (no pooling, no classifier)."""

    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        if in_channels < 1 or width < 1:
            raise ValueError(f"ResNet18 needs in_channels >= 1 and width >= 1, got {in_channels} and {width}.")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_dim = 8 * width

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class ImageEncoder(nn.Module):
    """``[B, C, H, W]`` (e.g. a spectrogram ``[B, 1, F, T]``) ``-> [B, 8*width]``."""

    def __init__(self, in_channels: int, width: int = 64):
        super().__init__()
        self.net = ResNet18(in_channels, width)
        self.out_dim = self.net.out_dim

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.net(x).mean(dim=(2, 3))


class FrameEncoder(nn.Module):
    """``[B, T, C, H, W]`` frames ``-> [B, 8*width]``: time folded into the batch, one shared
    ResNet-18, the maps averaged over time and space."""

    def __init__(self, in_channels: int = 3, width: int = 64):
        super().__init__()
        self.net = ResNet18(in_channels, width)
        self.out_dim = self.net.out_dim

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t = x.shape[:2]
        maps = self.net(x.reshape(b * t, *x.shape[2:]))  # [B*T, D, h, w]
        return maps.reshape(b, t, *maps.shape[1:]).mean(dim=(1, 3, 4))


class LinearHead(nn.Module):
    """One linear layer ``out`` (``[B, D] -> [B, C]``), the fused head of the papers' late fusion."""

    def __init__(self, in_dim: int, num_outputs: int):
        super().__init__()
        self.out = nn.Linear(in_dim, num_outputs)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(z)


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("resnet18")
def resnet18_late_fusion(input_shapes, task: Task, width: int = 64) -> MultimodalModel:
    """A ResNet-18 per modality (``[C, H, W]`` images/spectrograms or ``[T, C, H, W]`` frames),
    concatenation, a linear head (see the module docstring)."""
    if not task.one_of(("classification",)):
        raise ValueError(f"resnet18 is a classification model, got a {task.kind} task.")
    encoders: dict[str, nn.Module] = {}
    for m, shape in input_shapes.items():
        if len(shape) == 3:
            encoders[m] = ImageEncoder(int(shape[0]), int(width))
        elif len(shape) == 4:
            encoders[m] = FrameEncoder(int(shape[1]), int(width))
        else:
            raise ValueError(f"resnet18 needs [C, H, W] or [T, C, H, W] samples; modality {m!r} has shape {shape}.")
    model = LateFusionModel(encoders, ConcatFusion(),
                            LinearHead(sum(e.out_dim for e in encoders.values()), task.num_outputs))
    init_weights(model)
    return model
