"""MMPareto: Pareto-integrated multimodal and unimodal gradients."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import distributed
from ..types import ModelOutput
from ._common import HeadMethod
from .base import Support
from .registry import register_method


def min_norm_weight(a: Tensor, b: Tensor) -> Tensor:
    """The w in [0, 1] minimising ||w a + (1 - w) b||^2 (two-task MGDA), for flat vectors."""
    diff = a - b
    denom = diff.square().sum()
    w = ((b - a) * b).sum() / denom.clamp_min(1e-20)
    return torch.where(denom > 0, w.clamp(0, 1), torch.full_like(w, 0.5))


def pareto_combine(g_mm: Sequence[Tensor], g_uni: Sequence[Tensor], gamma: float = 1.5) -> tuple[list[Tensor], Tensor]:
    """Combine one encoder's multimodal and unimodal gradients (lists of per-parameter tensors).

    cos = cos(g_mm, g_uni) over the concatenated encoder gradient; weights (1/2, 1/2) if cos > 0,
    else the min-norm weights (w, 1 - w); g = 2 (w g_mm + (1 - w) g_uni), rescaled up to the norm
    of g_mm + g_uni if it is shorter, then multiplied by gamma. Returns the new gradients and cos.
    """
    a = torch.cat([g.reshape(-1) for g in g_mm])
    b = torch.cat([g.reshape(-1) for g in g_uni])
    cos = (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-20)
    w = torch.where(cos > 0, torch.full_like(cos, 0.5), min_norm_weight(a, b))
    new = 2 * (w * a + (1 - w) * b)
    ratio = (a + b).norm() / new.norm().clamp_min(1e-20)
    new = new * torch.where(ratio > 1, ratio, torch.ones_like(ratio)) * gamma
    out, offset = [], 0
    for g in g_mm:
        out.append(new[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
    return out, cos


@register_method("mmpareto")
class MMPareto(HeadMethod):
    """MMPareto: resolve conflicts between the multimodal and unimodal gradients of each encoder.

    Y. Wei, D. Hu. "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance".
    ICML 2024, arXiv:2405.17730.

    Losses: L_mm (fused prediction) and L_m = CE(f_m(h_m), y) with method-owned linear heads f_m
    on live features. For each encoder m, g_mm = dL_mm/dtheta_m and g_m = dL_m/dtheta_m are taken
    separately (1 + M extra backward passes) and combined by :func:`pareto_combine`: equal weights
    when they agree, the two-task min-norm (MGDA) point when cos <= 0, so the result has a
    non-negative inner product with both; then magnitude restored to at least ||g_mm + g_m|| and
    scaled by gamma (1.5 in the authors' code). Heads and fusion keep the gradient of
    L_mm + sum_m L_m. Deviation: the authors rescale each parameter tensor by its own norm ratio,
    which can break the non-negative inner product over the whole encoder; here one ratio per
    encoder keeps the paper's guarantee. Per-encoder gradients are averaged across DDP ranks.
    Records ``cos/<m>``.
    """

    name = "mmpareto"
    source = 'Wei & Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance", ICML 2024'
    support = Support(needs="a model that declares modality_parameters(); per-modality features",
                      edits_gradients=True)

    def __init__(self, gamma: float = 1.5, head_lr: float = 1e-3, head_weight_decay: float = 0.0) -> None:
        super().__init__(head_lr, head_weight_decay)
        if not gamma > 0:
            raise ValueError(f"MMPareto gamma must be > 0, got {gamma}.")
        self.gamma = float(gamma)

    def setup(self) -> None:
        self.modality_parameter_groups()

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        uni = [self.task.loss(z, target) for z in self.uni_logits(out, target)]
        self.stage("parts", [task_loss, *uni])  # L_mm and each L_m, for this step's compute_gradients
        return task_loss + torch.stack(uni).sum()

    def _grads(self, loss: Tensor, params: list[torch.nn.Parameter]) -> list[Tensor]:
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        gs = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
        if distributed.is_distributed():
            flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in gs])) / distributed.world_size()
            out, off = [], 0
            for g in gs:
                out.append(flat[off: off + g.numel()].view_as(g))
                off += g.numel()
            gs = out
        return gs

    def compute_gradients(self, loss: Tensor) -> None:
        parts = self.staged("parts")
        if parts is None:
            loss.backward()
            return
        l_mm, *uni = parts
        groups = self.modality_parameter_groups()
        combined = []
        for i, ps in enumerate(groups):
            if not ps:
                combined.append(None)
                continue
            g_mm = self._grads(l_mm, ps)
            g_u = self._grads(uni[i], ps)
            new, cos = pareto_combine(g_mm, g_u, self.gamma)
            self.record(f"cos/{self.modalities[i]}", cos)
            combined.append(new)
        loss.backward()
        for ps, new in zip(groups, combined):
            if new is None:
                continue
            for p, g in zip(ps, new):
                p.grad = g.to(p.dtype).clone()
