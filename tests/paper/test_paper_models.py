import pytest
import torch

from cggm.models import MapClassifier, build_classifier, build_model, head_layer_hidden
from cggm.types import Task


def test_paper_transformer_honours_padding_and_scales_projections():
    shapes = {"text": (6, 10), "audio": (9, 3), "vision": (4, 5)}
    model = build_model("paper_transformer", shapes, Task("regression", 1), d_model=8, heads=2, encoder_layers=3).eval()
    assert len(model.fusion.encoder.layers) == 1  # encoder depth - 2, as in the paper's code
    x = {m: torch.randn(2, *s) for m, s in shapes.items()}
    masks = {m: torch.ones(2, s[0], dtype=torch.bool) for m, s in shapes.items()}
    masks["audio"][0, 5:] = False
    out = model(x, masks)
    assert out.prediction.shape == (2, 1) and [h.shape[1] for h in out.features] == [6, 9, 4]
    x2 = {m: v.clone() for m, v in x.items()}
    x2["audio"][0, 5:] = 100.0  # padded positions do not matter
    assert torch.allclose(model(x2, masks).prediction, out.prediction, atol=1e-5)
    # each modality's Conv1d input projection belongs to its encoder (scaled with it by CGGM)
    for m in shapes:
        assert any(p is model.encoders[m].proj.weight for p in model.modality_parameters()[m])


def test_paper_seg_shapes_head_and_classifiers():
    shapes = {m: (1, 30, 26) for m in ("flair", "t1", "t1ce", "t2")}
    model = build_model("paper_seg", shapes, Task("segmentation", 4), width=4)
    x = {m: torch.randn(3, *s) for m, s in shapes.items()}
    out = model(x)
    assert out.prediction.shape == (3, 4, 30, 26)
    assert all(h.shape == (3, 16, 8, 7) for h in out.features)
    assert isinstance(model.head_layer, torch.nn.Conv2d) and model.head_layer.kernel_size == (1, 1)
    clf = build_classifier(out.features[0].detach(), head_layer_hidden(model.head_layer), 4)
    assert isinstance(clf, MapClassifier)
    assert clf.last.weight.shape == model.head_layer.weight.shape  # Eq. 12 compares these gradients
    assert clf(out.features[0].detach(), size=(30, 26)).shape == (3, 4, 30, 26)
    with pytest.raises(ValueError, match="segmentation"):
        build_model("paper_seg", shapes, Task("classification", 4))
