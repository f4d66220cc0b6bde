"""Adaptive Gradient Modulation (AGM)."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .. import distributed
from ..types import ModelOutput
from ._common import in_window, predict_only
from .base import Method, Support
from .registry import register_method


def shapley_responses(predict, num_modalities: int, full: Tensor | None = None) -> list[Tensor]:
    """Mono-modal responses: the Shapley value of each modality's contribution to the output.

    ``predict(keep)`` gives the output with only the modalities in ``keep`` (a tuple of indices);
    the empty coalition is worth 0, so the responses sum to the full output:

        m_i = sum_{S subset of others} |S|! (M - |S| - 1)! / M! * (f(S + {i}) - f(S)).
    """
    M = num_modalities
    cache: dict[tuple[int, ...], Tensor] = {}

    def f(keep: tuple[int, ...]) -> Tensor | float:
        if not keep:
            return 0.0
        if keep not in cache:
            cache[keep] = full if (full is not None and len(keep) == M) else predict(keep)
        return cache[keep]

    out = []
    for i in range(M):
        others = [j for j in range(M) if j != i]
        total = 0.0
        for size in range(M):
            w = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
            for S in itertools.combinations(others, size):
                total = total + w * (f(tuple(sorted(S + (i,)))) - f(tuple(S)))
        out.append(total)
    return out


def agm_coefficients(scores: Tensor, running: Tensor, alpha: float, clamp: float = 7.0) -> tuple[Tensor, Tensor, Tensor]:
    """``r = exp(M/(M-1) (s - mean s))``, ``eta`` the same on the running scores, and
    ``k = exp(alpha * min(eta - r, clamp))``; scores are higher-is-better (negative mono-modal CE)."""
    M = scores.numel()
    c = M / (M - 1)
    r = torch.exp(c * (scores - scores.mean()))
    eta = torch.exp(c * (running - running.mean()))
    k = torch.exp(alpha * (eta - r).clamp_max(clamp))
    return r, eta, k


@register_method("agm")
class AGM(Method):
    """AGM: scale each encoder's gradient to keep the modalities' mono-modal responses balanced.

    H. Li et al. "Boosting Multi-modal Model Performance with
    Adaptive Gradient Modulation". ICCV 2023.

    Per batch: 2^M - 1 extra no-grad evaluations of ``model.predict`` with subsets of the
    modalities' features zeroed give the Shapley mono-modal responses m_i (see
    :func:`shapley_responses`; the empty coalition counts 0). The score of modality i is
    s_i = -CE(m_i, y) (mean over the batch, true-class probability floored at 1e-8), averaged
    over DDP ranks. With the running mean s_hat of past scores (cumulative average over steps),

        r_i = exp(M/(M-1) (s_i - mean_j s_j)),  eta_i = exp(M/(M-1) (s_hat_i - mean_j s_hat_j)),
        k_i = exp(alpha * min(eta_i - r_i, 7)),

    and encoder i's gradient is multiplied by k_i (a hook on h_i, so every encoder parameter gets
    exactly k_i times its gradient), for epochs in [start_epoch, end_epoch]. A modality that falls
    behind its usual share gets k > 1 (boost); one that runs ahead gets k < 1.

    The official code could not be read (peers.md); this follows the two-modality formulation
    of the reimplementation in BalanceMM (ratio_a = exp(CE_v - CE_a)), generalised to M as its
    Shapley classes do. Deviations: responses are taken by zeroing *features* (one encoder pass)
    rather than inputs (2^M - 1 encoder passes), the masked forwards run in the model's current
    mode, biases are scaled like weights, and BalanceMM's extra clipping of the head gradient at 5
    is left to the engine's ``clip_grad_norm``. Records ``k/<m>``, ``r/<m>``, ``score/<m>``.
    """

    name = "agm"
    source = ('Li et al., "Boosting Multi-modal Model Performance with Adaptive Gradient Modulation", ICCV 2023 '
              "(official code unread; follows BalanceMM's reimplementation)")
    support = Support(tasks=("classification",), max_modalities=6,
                      needs="encode/predict with zeroable features; 2^M - 1 extra head passes per step")

    def __init__(self, alpha: float = 0.1, start_epoch: int = 0, end_epoch: int | None = None, clamp: float = 7.0) -> None:
        super().__init__()
        if not alpha >= 0:
            raise ValueError(f"AGM alpha must be >= 0, got {alpha}.")
        self.alpha, self.clamp = float(alpha), float(clamp)
        self.start_epoch, self.end_epoch = int(start_epoch), end_epoch
        self.uses_epochs(self.start_epoch, self.end_epoch)
        self.add_state("running", None)  # running mean of the scores (a tensor once a step is taken)
        self.add_state("count", 0)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        M = len(self.modalities)
        with torch.no_grad():
            feats = [h.detach() for h in out.features]
            responses = shapley_responses(lambda keep: predict_only(self.model, feats, out.masks, keep), M,
                                          full=out.prediction.detach())
            scores = torch.stack([
                -torch.log(F.softmax(m.float(), dim=1).gather(1, target.long().unsqueeze(1)).clamp_min(1e-8)).mean()
                for m in responses]).neg()
            scores = distributed.weighted_mean(scores, target.shape[0])
            running = torch.zeros_like(scores) if self.running is None else self.running.to(scores.device)
            r, eta, k = agm_coefficients(scores, running, self.alpha, self.clamp)
        self.stage("scores", scores)
        for i, m in enumerate(self.modalities):
            self.record(f"k/{m}", k[i])
            self.record(f"r/{m}", r[i])
            self.record(f"score/{m}", scores[i])
        if in_window(self.epoch, self.start_epoch, self.end_epoch):
            self.scale_feature_gradients(out, k)
        return task_loss

    def on_step_taken(self) -> None:
        """The running mean of the scores advances once per step taken (by the step's mean score)."""
        scores = self.staged("scores")
        running = torch.zeros_like(scores) if self.running is None else self.running.to(scores.device)
        self.count += 1
        self.running = running * (self.count - 1) / self.count + scores / self.count
