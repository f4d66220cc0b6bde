"""Utilization diagnostics: linear probes of each encoder, and the drop when a modality is removed."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..data.base import BatchIterator, MultimodalDataset
from ..data.stream import no_augmentation, split_targets
from ..models.blocks import pool
from ..types import Task


@torch.no_grad()
def encode_split(model: nn.Module, dataset: MultimodalDataset, batch_size: int = 512) -> list[torch.Tensor]:
    """Pooled features ``[N, D_i]`` of every modality for a whole split (model in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    chunks: list[list[torch.Tensor]] = []
    for inputs, masks, _ in BatchIterator(dataset, batch_size, shuffle=False):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        masks = {k: v.to(device) for k, v in masks.items()}
        feats = model.encode(inputs, masks)
        mlist = model.modality_masks(masks)
        chunks.append([pool(h, None if mlist is None else mlist[i]).flatten(1).float().cpu()
                       for i, h in enumerate(feats)])
    return [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 task: Task, steps: int = 300, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Fit a linear layer on frozen features (full-batch L-BFGS on standardised features) and
    return its test accuracy (classification) or -MAE (regression). Segmentation is not probed."""
    if not task.probes:
        raise ValueError("linear_probe supports classification and regression features, not segmentation maps.")
    g = torch.Generator().manual_seed(seed)
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mu) / sd, (test_x - mu) / sd
    out_dim = task.num_outputs if task.labels else 1
    layer = nn.Linear(xtr.shape[1], out_dim)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.01)
        layer.bias.zero_()
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        out = layer(xtr)
        if task.labels:
            loss = F.cross_entropy(out, train_y)
        else:
            loss = F.mse_loss(out.squeeze(-1), train_y.float().reshape(-1))
        loss = loss + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = layer(xte)
        if task.labels:
            return float((pred.argmax(1) == test_y).float().mean())
        return -float((pred.squeeze(-1) - test_y.float().reshape(-1)).abs().mean())


def probe_encoders(model: nn.Module, train: MultimodalDataset, test: MultimodalDataset, task: Task) -> dict[str, float]:
    """Linear-probe score of each modality's encoder (trained on ``train``, scored on ``test``)."""
    with no_augmentation(train):  # the split as it is, not randomly cropped
        ftr, fte = encode_split(model, train), encode_split(model, test)
    ytr, yte = split_targets(train), split_targets(test)  # memory-mapped splits have no .target
    return {m: linear_probe(a, ytr, b, yte, task) for m, a, b in zip(model.modalities, ftr, fte)}
