"""The ResNet-18 late-fusion model of the audio-visual benchmarks (``resnet18``)."""

import pytest
import torch

from cggm.models import build_model
from cggm.models.resnet import FrameEncoder, ImageEncoder, ResNet18
from cggm.types import Task


def test_resnet18_is_resnet18():
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in its 1000-class fc layer
    assert sum(p.numel() for p in ResNet18(3).parameters()) == 11_689_512 - 513_000
    # a 1-channel stem for spectrograms: 6,272 fewer weights in the 7 x 7 conv
    assert sum(p.numel() for p in ResNet18(1).parameters()) == 11_176_512 - 2 * 64 * 49
    assert ResNet18(3)(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)


def test_frames_fold_time_into_the_batch_and_pool_over_time():
    torch.manual_seed(0)
    frames = FrameEncoder(3, width=4).eval()
    image = ImageEncoder(3, width=4).eval()
    image.net.load_state_dict(frames.net.state_dict())
    x = torch.randn(2, 3, 3, 24, 24)
    with torch.no_grad():
        per_frame = torch.stack([image(x[:, t]) for t in range(3)], dim=1)  # [B, T, D]
        assert torch.allclose(frames(x), per_frame.mean(dim=1), atol=1e-6)


def test_resnet18_late_fusion_model():
    model = build_model("resnet18", {"audio": (1, 40, 30), "visual": (2, 3, 32, 32)}, Task("classification", 6),
                        width=4)
    assert model.modalities == ("audio", "visual")
    out = model({"audio": torch.randn(3, 1, 40, 30), "visual": torch.randn(3, 2, 3, 32, 32)})
    assert out.prediction.shape == (3, 6) and [f.shape for f in out.features] == [(3, 32), (3, 32)]
    head = model.head_layer
    assert isinstance(head, torch.nn.Linear) and head.in_features == 64  # concatenation, one linear layer
    owned = {id(p) for ps in model.modality_parameters().values() for p in ps}
    assert {id(p) for p in model.shared_parameters()} == {id(head.weight), id(head.bias)}
    assert len(owned) + 2 == len(list(model.parameters()))
    with pytest.raises(ValueError, match="resnet18 needs"):
        build_model("resnet18", {"a": (5,), "b": (1, 8, 8)}, Task("classification", 2))
