"""OGM+ (the TPAMI 2024 code's ``use_OGM_plus``): amplify the weak modality's encoder gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from ..types import ModelOutput
from .base import Support
from .ogm_ge import OGMGE
from .registry import register_method


def ogm_plus_coefficients(ratio: Tensor, boost: float) -> Tensor:
    """``k_m = boost`` for the weak modality (``rho_m < 1``), else 1."""
    return torch.where(ratio < 1, torch.full_like(ratio, boost), torch.ones_like(ratio))


@register_method("ogm_plus")
class OGMPlus(OGMGE):
    """OGM+: multiply the weak modality's encoder gradients by a constant (4) instead of damping the dominant one.

    Y. Wei, D. Hu, H. Du, J.-R. Wen. "On-the-fly Modulation for Balanced Multimodal Learning".
    TPAMI 2024, arXiv:2410.11582; code GeWu-Lab/BML_TPAMI2024:code/main.py@4b3aa4f, option
    ``use_OGM_plus`` (spec: shared/docs/methods-balancemm.md section 2; BalanceMM has only the CVPR
    OGM). The rest of that code's OGM equals ``ogm``/``ogm_ge`` (see :class:`~cggm.methods.opm.OPM`).

    Scores and ratio as in :class:`~cggm.methods.ogm_ge.OGMGE` (s_m = sum_i softmax(f_m(x_i))[y_i],
    rho_m = s_m / s_m'); after the backward pass every parameter of encoder m gets

        g <- k_m g,  k_m = ``boost`` if rho_m < 1 (the weak modality), else 1 (the dominant one),

    plus N(0, std(g)^2) noise if ``noise`` (the GE option, off by default: whether the authors
    combine it with OGM+ is unverified). Defaults from the authors' code and script: ``boost = 4``,
    no modulation for epochs <= 5 (``start_epoch = 6``, epochs counted from 0) and modulation epochs
    up to 60 (``end_epoch = 60``). Two modalities only, as the code (which one is weak is not defined
    for more). Deviation (as ``ogm``): every trainable encoder parameter is modulated, not only 4-D
    conv weights found by name.
    """

    name = "ogm_plus"
    source = ('Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024 '
              '(arXiv:2410.11582); code GeWu-Lab/BML_TPAMI2024')
    support = Support(max_modalities=2, tasks=("classification",), edits_gradients=True, epoch_hooks=True,
                      needs="two modalities; a model that declares modality_parameters()")

    def __init__(self, boost: float = 4.0, noise: bool = False, start_epoch: int = 6, end_epoch: int | None = 60,
                 seed: int | None = None) -> None:
        super().__init__(noise=noise, start_epoch=start_epoch, end_epoch=end_epoch, seed=seed)
        if not boost > 0:
            raise ValueError(f"OGM+ boost must be > 0, got {boost}.")
        self.boost = float(boost)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        loss = super().compute_loss(out, target, task_loss)
        ratio = torch.stack([self.records()[f"ratio/{m}"] for m in self.modalities])  # OGM's, recorded above
        self.k = ogm_plus_coefficients(ratio, self.boost)
        for i, m in enumerate(self.modalities):
            self.record(f"k/{m}", self.k[i])
        return loss
