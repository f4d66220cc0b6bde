"""MMCosine: multi-modal cosine logits."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models.blocks import ConcatFusion, pool
from ..types import ModelOutput
from .base import Method, Support, UnsupportedSettingError
from .registry import register_method
from .state import AuxModules


def linear_concat_head(model: nn.Module) -> nn.Linear | None:
    """The model's head when it is one ``nn.Linear`` on the concatenated pooled features (a
    ``ConcatFusion`` followed directly by ``head_layer``), so its weight splits by modality into
    blocks ``W = [W_1 | ... | W_M]``; else ``None``."""
    head, layer = getattr(model, "head", None), getattr(model, "head_layer", None)
    if isinstance(getattr(model, "fusion", None), ConcatFusion) and isinstance(layer, nn.Linear) and head is layer:
        return layer
    return None


def pooled_features(out: ModelOutput) -> list[Tensor]:
    """Each modality's feature as a ``[B, D_m]`` vector (sequences mean-pooled over real tokens)."""
    feats = []
    for i, h in enumerate(out.features):
        if h.ndim not in (2, 3):
            raise UnsupportedSettingError(f"Needs vector or sequence features; modality {i} has shape {tuple(h.shape)}.")
        feats.append(pool(h, out.mask(i)))
    return feats


def cosine_logits(features: list[Tensor], weights: list[Tensor], scale: float) -> list[Tensor]:
    """``z_m = s * <h_m/|h_m|, w_{m,c}/|w_{m,c}|>`` for each modality: ``[B, C]`` each."""
    return [scale * F.normalize(h, dim=1) @ F.normalize(w, dim=1).t() for h, w in zip(features, weights)]


def mmcosine_nce(fa: Tensor, fb: Tensor, target: Tensor, tau: float = 0.1) -> Tensor:
    """The supplementary's optional inter-modal term: ``P_ij = softmax_j(cos(fa_i, fb_j)/tau)``;
    per anchor i, mean over same-label j of ``-log P_ij`` plus mean over different-label j of
    ``-log(1 - P_ij)`` (an empty set counts 0), mean over the batch."""
    P = (F.normalize(fa, dim=1) @ F.normalize(fb, dim=1).t() / tau).softmax(dim=1)
    same = (target.unsqueeze(0) == target.unsqueeze(1)).to(P.dtype)
    diff = 1.0 - same
    pos = -(torch.log(P.clamp_min(1e-12)) * same).sum(1) / same.sum(1).clamp_min(1.0)
    neg = -(torch.log((1 - P).clamp_min(1e-12)) * diff).sum(1) / diff.sum(1).clamp_min(1.0)
    return (pos + neg).mean()


class _CosineBlock(nn.Module):
    """A method-owned class-weight block for one modality (no bias): ``[C, D_m]``."""

    def __init__(self, dim: int, num_outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_outputs, dim))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)


@register_method("mmcosine")
class MMCosine(Method):
    """MMCosine: fused logits are a sum of scaled cosines, one per modality, so no modality dominates by norm.

    H. Xu, K. Feng, R. Zhang, D. Hu (Xu, Feng, Zhang, Hu). "MMCosine: Multi-Modal Cosine Loss
    Towards Balanced Audio-Visual Fine-Grained Learning". ICASSP 2023, arXiv:2303.05338; code
    GeWu-Lab/MMCosine_ICASSP23:main_CD.py@00ba0a9; toolkit GeWu-Lab/BalanceBenchmark:
    balancemm/trainer/MMCosine_trainer.py@4c1482f (spec: shared/docs/methods-balancemm.md section 4).

    With the head's weight split by modality ``W = [W_1 | ... | W_M]`` and ``w_{m,c}`` row c of W_m,

        z_{m,c} = s * <h_m / |h_m|, w_{m,c} / |w_{m,c}|>,   z = sum_m z_m   (no bias),
        L = CE(z, y) + lam_nce * L_NCE,

    and the prediction scored at evaluation is the same z (argmax sum_m z_m, as BalanceMM; the
    authors' CREMA-D validation scores the raw linear output with bias, a train/eval mismatch not
    reproduced). ``h_m`` is the pooled feature (sequences mean-pooled over real tokens).

    Where the class weights live (``head``): ``"model"`` uses ``model.head_layer`` when the model's
    head is one ``nn.Linear`` on a ``ConcatFusion`` (the paper's setting; split by the features'
    widths, not a hard-coded 512; its bias is unused and gets no gradient); ``"own"`` uses
    method-owned blocks ``[C, D_m]`` trained by their own optimizer (``head_lr``; the model's head is
    then unused: ours, for models whose head is not a split linear layer); ``"auto"`` (default)
    picks ``"model"`` when possible, else ``"own"``.

    Defaults: ``scale=10`` is the official README's s; BalanceMM uses 15 (pass ``scale=15``).
    ``lam_nce=0`` as the official main_CD.py. L_NCE (supplementary, optional): for each pair of
    modalities (m < n; the paper has two), P_ij = softmax_j(cos(h_m,i, h_n,j)/tau), tau = 0.1,
    per anchor the mean over same-label j of -log P_ij plus the mean over different-label j of
    -log(1 - P_ij) (needs equal feature widths; an anchor with no different-label j contributes 0 there, where the code divides
    0 by 0), batch mean, averaged over pairs (ours for M > 2). Unverified: the paper's full text
    (not available to us); the NCE term follows the authors' code. Records ``cos/<m>``: the batch
    mean of z_m at the true class divided by s.
    """

    name = "mmcosine"
    source = ('Xu, Feng, Zhang, Hu, "MMCosine: Multi-Modal Cosine Loss Towards Balanced Audio-Visual Fine-Grained '
              'Learning", ICASSP 2023 (arXiv:2303.05338); code GeWu-Lab/MMCosine_ICASSP23')
    # (not under DDP: the model's forward still computes its fused prediction, whose head bias (and, with
    # method-owned weights, the whole head) the cosine loss never uses, so DDP waits for gradients that never come)
    support = Support(tasks=("classification",), unused_parameters=True, ddp=False,
                      needs="vector or sequence features; a linear head on ConcatFusion (else method-owned cosine weights)")

    def __init__(self, scale: float = 10.0, lam_nce: float = 0.0, tau: float = 0.1, head: str = "auto",
                 head_lr: float = 1e-3) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"MMCosine scale must be > 0, got {scale}.")
        if head not in ("auto", "model", "own"):
            raise ValueError(f"MMCosine head must be 'auto', 'model' or 'own', got {head!r}.")
        if lam_nce < 0 or not tau > 0:
            raise ValueError(f"MMCosine needs lam_nce >= 0 and tau > 0, got {lam_nce}, {tau}.")
        self.scale, self.lam_nce, self.tau, self.head = float(scale), float(lam_nce), float(tau), head
        self.add_state("blocks", AuxModules(build=lambda h, i: _CosineBlock(h.shape[-1], self.task.num_outputs),
                                            lr=head_lr))
        self.uses_model_head = False

    def setup(self) -> None:
        layer = linear_concat_head(self.model)
        if self.head == "model" and layer is None:
            raise UnsupportedSettingError(
                "mmcosine(head='model') needs a model whose head is one nn.Linear on ConcatFusion (model.head is "
                "model.head_layer), so its weight splits by modality; use head='own' for other heads.")
        self.uses_model_head = self.head != "own" and layer is not None

    def class_weights(self, out: ModelOutput, feats: list[Tensor]) -> list[Tensor]:
        """Each modality's ``[C, D_m]`` block of class weights."""
        if not self.uses_model_head:
            return [b.weight for b in self.blocks.ensure(feats)]
        W = self.model.head_layer.weight
        widths = [h.shape[1] for h in feats]
        if sum(widths) != W.shape[1]:
            raise UnsupportedSettingError(f"The head takes {W.shape[1]} inputs but the features' widths {widths} sum "
                                          f"to {sum(widths)}: the head is not split by modality.")
        return list(torch.split(W, widths, dim=1))

    def modality_logits(self, out: ModelOutput) -> list[Tensor]:
        """The cosine logits z_m of each modality (their sum is the prediction)."""
        feats = pooled_features(out)
        return cosine_logits(feats, self.class_weights(out, feats), self.scale)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        feats = pooled_features(out)
        zs = cosine_logits(feats, self.class_weights(out, feats), self.scale)
        loss = self.task.loss(torch.stack(zs).sum(0), target)
        for m, z in zip(self.modalities, zs):
            self.record(f"cos/{m}", z.detach().gather(1, target.long().unsqueeze(1)).mean() / self.scale)
        if self.lam_nce > 0:
            if len({h.shape[1] for h in feats}) > 1:
                raise UnsupportedSettingError(f"mmcosine lam_nce > 0 compares features across modalities by cosine: "
                                              f"they need one width, got {[h.shape[1] for h in feats]}.")
            pairs = list(itertools.combinations(range(len(feats)), 2))
            nce = sum(mmcosine_nce(feats[a], feats[b], target, self.tau) for a, b in pairs) / len(pairs)
            self.record("nce", nce.detach())
            loss = loss + self.lam_nce * nce
        return loss

    def eval_prediction(self, out: ModelOutput) -> Tensor:
        return torch.stack(self.modality_logits(out)).sum(0)
