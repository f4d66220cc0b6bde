"""On-the-fly Gradient Modulation with Generalization Enhancement (OGM-GE), and plain OGM."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed
from ..types import ModelOutput
from ._common import in_window, others_mean, predict_only, true_class_prob
from .base import Method, Support
from .registry import register_method
from .state import SeededGenerator


def ogm_coefficients(scores: Tensor, alpha: float, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Discrepancy ratios and modulation coefficients from per-modality scores ``[M]``.

    rho_m = s_m / mean_{j != m} s_j;  k_m = 1 - tanh(alpha * relu(rho_m - offset)) if rho_m > 1,
    else 1. ``offset=0`` is Eq. 10 of the paper (and the authors' code); ``offset=1`` makes k
    continuous at rho = 1.
    """
    ratio = scores / others_mean(scores).clamp_min(1e-12)
    k = torch.where(ratio > 1, 1 - torch.tanh(alpha * torch.relu(ratio - offset)), torch.ones_like(ratio))
    return ratio, k


@register_method("ogm_ge")
class OGMGE(Method):
    """OGM-GE: damp the gradient of the dominant modality's encoder, plus Gaussian noise.

    X. Peng, Y. Wei, A. Deng, D. Wang, D. Hu. "Balanced Multimodal Learning via On-the-fly Gradient
    Modulation". CVPR 2022, arXiv:2203.15332.

    Per batch, each modality's score is s_m = sum_i softmax(f_m(x_i))[y_i], where the unimodal
    logits f_m are ``model.predict`` with the other modalities' features zeroed (for a linear
    concatenation head this is the paper's split of the head, up to how the bias is shared).
    With rho_m = s_m / mean_{j != m} s_j (= s_a / s_v for two modalities; for M > 2 an
    extension), the coefficient is k_m = 1 - tanh(alpha * rho_m) when rho_m > 1, else 1
    (Eq. 10; ``offset=1`` gives 1 - tanh(alpha (rho_m - 1)) instead). After the backward pass, for
    every parameter of encoder m:

        OGM:     g <- k_m g
        OGM-GE:  g <- k_m g + n,  n ~ N(0, std(g)^2)   (std of the unmodulated gradient)

    applied only for epochs in [start_epoch, end_epoch]. Only the fused loss is back-propagated.
    Deviation from the authors' code: it modulates only 4-D (conv) weights found by name; here
    every trainable parameter of the encoder (``model.modality_parameters()``) is modulated.
    Scores are summed over DDP ranks, so every rank applies the same k; the noise comes from the
    method's own generator (a declared :class:`~cggm.methods.state.SeededGenerator`), seeded
    identically on every rank (``seed``, default: the process's torch seed, ``torch.initial_seed()``,
    taken from rank 0), so the replicas stay identical; its state is saved with the method and
    rewound when a step is skipped.
    Records ``ratio/<m>`` and ``k/<m>``.
    """

    name = "ogm_ge"
    source = 'Peng, Wei, Deng, Wang, Hu, "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022 (arXiv:2203.15332)'
    support = Support(tasks=("classification",), needs="a model that declares modality_parameters()",
                      edits_gradients=True)

    def __init__(self, alpha: float = 0.8, noise: bool = True, start_epoch: int = 0, end_epoch: int | None = None,
                 offset: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"OGM alpha must be >= 0, got {alpha}.")
        self.alpha, self.noise, self.offset = float(alpha), bool(noise), float(offset)
        self.start_epoch, self.end_epoch = int(start_epoch), end_epoch
        self.uses_epochs(self.start_epoch, self.end_epoch)
        self.seed = seed
        self.k: Tensor | None = None  # this step's coefficients, set by compute_loss every step
        self.add_state("noise_generator", SeededGenerator(seed))

    def setup(self) -> None:
        self.modality_parameter_groups()

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        with torch.no_grad():
            feats = [h.detach() for h in out.features]
            scores = torch.stack([true_class_prob(predict_only(self.model, feats, out.masks, [i]), target).sum()
                                  for i in range(len(feats))])
            scores = distributed.all_reduce_sum(scores)
            ratio, self.k = ogm_coefficients(scores, self.alpha, self.offset)
        for i, m in enumerate(self.modalities):
            self.record(f"ratio/{m}", ratio[i])
            self.record(f"k/{m}", self.k[i])
        return task_loss

    def edit_gradients(self) -> None:
        if self.k is None or not in_window(self.epoch, self.start_epoch, self.end_epoch):
            return
        with torch.no_grad():
            for i, ps in enumerate(self.modality_parameter_groups()):
                for p in ps:
                    if p.grad is None:
                        continue
                    g = p.grad
                    k = self.k[i].to(device=g.device, dtype=g.dtype)
                    if self.noise:
                        gen = self.noise_generator.get(g.device)
                        std = g.std() if g.numel() > 1 else torch.zeros((), device=g.device, dtype=g.dtype)
                        std = torch.nan_to_num(std) + 1e-8
                        noise = torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)
                        p.grad = g * k + noise * std
                    else:
                        p.grad = g * k


@register_method("ogm")
class OGM(OGMGE):
    """Plain OGM (no Gaussian noise); see :class:`OGMGE`."""

    name = "ogm"

    def __init__(self, alpha: float = 0.8, start_epoch: int = 0, end_epoch: int | None = None,
                 offset: float = 0.0) -> None:
        super().__init__(alpha=alpha, noise=False, start_epoch=start_epoch, end_epoch=end_epoch, offset=offset)
