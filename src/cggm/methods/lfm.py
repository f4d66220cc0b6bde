"""LFM: mix the fused CE with a cross-modal prediction-alignment term under a moving weight."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ..types import ModelOutput
from .base import EpochContext, Method, Support
from .mbsd import slice_logits
from .registry import register_method

# njustkmg/NeurIPS24-LFM:Crema_epoch.py@ad44fa0: alpha_0(e) = sum_k c_k e^k, fitted for 200 epochs
FITTED = (2.04623704e-1, 3.35472727e-3, 1.22989557e-4, -2.92947416e-6, 2.23835486e-8, -5.39717505e-11)
INITS = {"official": 0.95, "bmm": 0.05}  # alpha_1 at the start


def fitted_alpha0(epoch: int) -> float:
    """The authors' learning-fitted weight of the CE term at ``epoch`` (alpha_1 = 1 - alpha_0)."""
    return sum(c * float(epoch) ** k for k, c in enumerate(FITTED))


def lfm_alignment(logits: list[Tensor]) -> Tensor:
    """``A = 1/2 [KL(R||P) + KL(R||Q)]``, batch mean, with P, Q the softmax of two modalities'
    logits and R = (P + Q)/2 (mixture-to-member KL, not Jensen-Shannon); the mean over all pairs."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    pairs = list(itertools.combinations(range(len(logits)), 2))
    for a, b in pairs:
        lp, lq = logits[a].float().log_softmax(1), logits[b].float().log_softmax(1)
        r = (lp.exp() + lq.exp()) / 2
        lr = r.log()
        total = total + 0.5 * ((r * (lr - lp)).sum(1) + (r * (lr - lq)).sum(1)).mean()
    return total / len(pairs)


def lfm_delta(ce: Tensor, loss: Tensor, params: list[Tensor]) -> Tensor:
    """The learnable rule's statistic: with g = grad_theta ``loss`` (with graph) and c = grad_theta
    ``ce`` (a constant), H = grad_theta (g . c) = Hess(loss) c; the mean of H's entries for the first
    parameter tensor only."""
    g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    c = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    dot = sum((gi * ci.detach()).sum() for gi, ci in zip(g, c) if gi is not None and ci is not None)
    if not isinstance(dot, Tensor) or not dot.requires_grad:
        return torch.zeros((), device=params[0].device)
    (h,) = torch.autograd.grad(dot, [params[0]], allow_unused=True)
    return torch.zeros((), device=params[0].device) if h is None else h.mean()


@register_method("lfm")
class LFM(Method):
    """LFM: fused CE plus a cross-modal alignment term, their weight moved once per epoch (learnable or fitted).

    Y. Yang, F. Wan, Q.-Y. Jiang, Y. Xu. "Facilitating Multimodal Classification via Dynamically
    Learning Modality Gap". NeurIPS 2024; code njustkmg/NeurIPS24-LFM:Crema_epoch.py,
    Crema_epoch_learnable.py@ad44fa0; toolkit BalanceMM GeWu-Lab/BalanceBenchmark (spec:
    shared/docs/methods-balancemm.md section 7). The paper's abstract speaks of unsupervised
    contrastive learning; both codes use the prediction-alignment term below, as here.

    With unimodal logits z_m (slices ``W_m h_m + b/M`` of a linear head on ``ConcatFusion``, as
    BalanceMM; for any other head ``model.predict`` with the other modalities' features zeroed), the
    fused logits z, P = softmax(z_a), Q = softmax(z_b), R = (P + Q)/2:

        A = 1/2 [KL(R||P) + KL(R||Q)]  (batch mean; M > 2: mean over pairs, BalanceMM),
        L = 2 (alpha_0 CE(z) + alpha_1 A),  alpha_0 + alpha_1 = 1.

    ``mode="learnable"`` (default; the authors' Crema_epoch_learnable.py, BalanceMM's only path):
    at each epoch's start, on a fixed held-out batch V (the first ``v_size`` samples of the first
    batch of the ``v_split`` split, in train mode), L_V = alpha_0 CE_V + alpha_1 A_V,
    g = grad L_V (with graph), c = grad CE_V, H = grad(g . c), delta = mean of H over the FIRST
    trainable parameter tensor of the model only, then alpha_1 <- clip(alpha_1 - lr_alpha(e) delta,
    0.05, 0.95) with lr_alpha(e) = lr_alpha / 2^floor(e/20) (the code halves it when e > 0 and
    e mod 20 = 0). delta is not a hypergradient of a validation loss; it is the authors' first-layer
    statistic, implemented as coded. ``mode="fitted"``: alpha_0(e) = the authors' degree-5
    polynomial (fitted for 200 epochs; meaningless beyond).

    Defaults: ``lr_alpha = 1e-4`` (both codes). ``init="official"``: (alpha_0, alpha_1) = (0.05, 0.95),
    the authors' code; ``init="bmm"``: (0.95, 0.05), BalanceMM's reversed initialisation.
    ``v_size = 8``: the authors use the first half of a 16-sample subset held out from training;
    here the first 8 samples of the validation split (BalanceMM: the first quarter of its first
    validation batch, which is its test set). Deviations: the authors' model has separate unimodal
    heads with z = (z_a + z_b)/2; here the model's own fused logits and head slices (as BalanceMM).
    Not reproduced: BatchNorm statistics updated by V (the model's buffers are restored after the
    hyper-step), autograd anomaly detection, BalanceMM ignoring ``method: learning-fitted``.
    Records ``lfm/alpha1``, ``lfm/align``, ``lfm/ce``; ``last_delta`` keeps the last delta.
    """

    name = "lfm"
    source = ('Yang, Wan, Jiang, Xu, "Facilitating Multimodal Classification via Dynamically Learning Modality Gap", '
              'NeurIPS 2024; code njustkmg/NeurIPS24-LFM')
    support = Support(tasks=("classification",), epoch_hooks=True,
                      needs="unimodal logits: slices of a linear head on ConcatFusion, else zeroed predict; "
                            "a double backward once per epoch (learnable)")

    def __init__(self, mode: str = "learnable", init: str = "official", lr_alpha: float = 1e-4, v_size: int = 8,
                 v_split: str = "val", halve_every: int = 20) -> None:
        super().__init__()
        if mode not in ("learnable", "fitted"):
            raise ValueError(f"LFM mode must be 'learnable' or 'fitted', got {mode!r}.")
        if init not in INITS:
            raise ValueError(f"LFM init must be 'official' or 'bmm', got {init!r}.")
        self.mode, self.init, self.lr_alpha = mode, init, float(lr_alpha)
        self.v_size, self.v_split, self.halve_every = int(v_size), v_split, int(halve_every)
        self.add_state("alpha1", INITS[init] if mode == "learnable" else 1.0 - fitted_alpha0(0))
        self.last_delta: float | None = None

    def unimodal_logits(self, out: ModelOutput) -> list[Tensor]:
        return slice_logits(self.model, out)

    def lr_at(self, epoch: int) -> float:
        return self.lr_alpha / 2 ** (int(epoch) // self.halve_every)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if self.mode == "fitted":
            self.alpha1 = 1.0 - fitted_alpha0(ctx.epoch)
            return
        inputs, masks, target = next(iter(ctx.batches(self.v_split)))
        n = min(self.v_size, int(target.shape[0]))
        inputs = {k: v[:n] for k, v in inputs.items()}
        masks = {k: v[:n] for k, v in (masks or {}).items()}
        model = self.model
        params = [p for p in model.parameters() if p.requires_grad]
        buffers = [b.detach().clone() for b in model.buffers()]
        was_training = model.training
        model.train()
        try:
            out = ctx.forward(inputs, masks)
            ce = self.task.loss(out.prediction, target[:n])
            loss = (1 - self.alpha1) * ce + self.alpha1 * lfm_alignment(self.unimodal_logits(out))
            delta = float(lfm_delta(ce, loss, params))
        finally:
            model.train(was_training)
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
        self.last_delta = delta
        if math.isfinite(delta):
            self.alpha1 = min(0.95, max(0.05, self.alpha1 - self.lr_at(ctx.epoch) * delta))

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        align = lfm_alignment(self.unimodal_logits(out))
        a1 = float(self.alpha1)
        self.record("lfm/alpha1", torch.tensor(a1))
        self.record("lfm/align", align.detach())
        self.record("lfm/ce", task_loss.detach())
        return 2 * ((1 - a1) * task_loss + a1 * align.to(task_loss.dtype))
