"""Greedy learner balancing (Wu et al. 2022), for late-fusion models."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed
from ..types import ModelOutput
from .base import Method, Support
from .registry import register_method


@register_method("greedy")
class Greedy(Method):
    """Balanced multi-modal learning against greedy learning, adapted to late fusion.

    N. Wu, S. Jastrzebski, K. Cho, K. J. Geras. "Characterizing and Overcoming the Greedy Nature of
    Learning in Multi-modal Deep Neural Networks". ICML 2022, arXiv:2202.05306.

    The paper measures each modality's *conditional learning speed* from the relative gradient
    energy of parameters, sum_p ||g_p||^2 / ||theta_p||^2, and, when the speeds differ by more than
    a threshold, runs *re-balancing steps* in which the slower modality must carry the prediction:
    the faster modality's cross-modal signal is replaced by its running average (the MMTM
    "bypass"), so only the slower branch learns from it.

    Here (no MMTM; any late-fusion model, any M):

    * speed of modality m over a measuring window of ``window`` steps:
      mu_m = sum_steps sum_{p in encoder m} ||g_p||^2 / ||theta_p||^2 (from ``modality_parameters``);
    * imbalance d = log10(max_m mu_m / min_m mu_m); the slow modality is argmin_m mu_m;
    * if d > ``threshold``, the next ``window`` steps are re-balancing steps: every modality other
      than the slow one has its features replaced by their running batch mean (momentum
      ``momentum``, detached), the prediction is recomputed with ``model.predict`` on these
      features and the task loss is taken on it; then a new measuring window starts.

    The decision is a device tensor (no host sync): a balanced window gives re-balancing steps
    that are exactly joint steps. Deviations from the authors' code: speeds are of whole encoders
    (late fusion has no bypass parameters), and measuring / re-balancing alternate in fixed
    windows instead of a per-step check. Starts at ``start_epoch`` (the authors' configs use 2).
    Records ``speed/<m>`` (measuring steps) and ``rebalance/<m>`` (1 where a modality is replaced).
    """

    name = "greedy"
    source = 'Wu, Jastrzebski, Cho, Geras, ICML 2022 (arXiv:2202.05306); adapted to late fusion'
    support = Support(needs="a model that declares modality_parameters() and has encode/predict",
                      unused_parameters=True, edits_gradients=True, epoch_hooks=True)  # start_epoch: reads the epoch

    def __init__(self, window: int = 5, threshold: float = 0.01, start_epoch: int = 2, momentum: float = 0.9) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"Greedy window must be >= 1, got {window}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"Greedy momentum must be in [0, 1), got {momentum}.")
        self.window, self.threshold, self.start_epoch, self.momentum = int(window), float(threshold), int(start_epoch), float(momentum)
        self.add_state("phase", "measure")
        self.add_state("count", 0)
        self.add_state("speed_sum", None)  # [M] once measured
        self.add_state("replace", None)  # [M] float, 1 = replace by the running mean
        self.add_state("feature_mean", None)  # one [D...] tensor per modality

    def setup(self) -> None:
        self.modality_parameter_groups()

    @property
    def active(self) -> bool:
        return self.epoch >= self.start_epoch

    def _updated_means(self, means: list[Tensor]) -> list[Tensor]:
        """The running feature means with this batch's means folded in."""
        if self.feature_mean is None or any(a.shape != b.shape for a, b in zip(self.feature_mean, means)):
            return means
        return [self.momentum * a + (1 - self.momentum) * b for a, b in zip(self.feature_mean, means)]

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        means = [distributed.weighted_mean(h.detach().mean(dim=0), target.shape[0]) for h in out.features]
        means = self._updated_means(means)
        self.stage("means", means)  # kept when the step is taken
        if not (self.active and self.phase == "rebalance"):
            return task_loss
        r = self.replace.to(out.features[0].device)
        feats = []
        for i, (h, mu) in enumerate(zip(out.features, means)):
            self.record(f"rebalance/{self.modalities[i]}", r[i])
            ri = r[i].to(h.dtype)
            feats.append(h * (1 - ri) + mu.to(h.dtype).unsqueeze(0).expand_as(h) * ri)
        prediction = self.model.predict(feats, out.masks)
        return self.task.loss(prediction, target)

    def edit_gradients(self) -> None:
        """Measure the step's speeds from its gradients (staged; they count when the step is taken)."""
        if not (self.active and self.phase == "measure"):
            return
        speeds = []
        for ps in self.modality_parameter_groups():
            with_grad = [p for p in ps if p.grad is not None]
            if not with_grad:
                device = ps[0].device if ps else next(self.model.parameters()).device
                speeds.append(torch.zeros((), device=device))
                continue
            g = torch.stack(torch._foreach_norm([p.grad for p in with_grad])).square()
            w = torch.stack(torch._foreach_norm([p.detach() for p in with_grad])).square().clamp_min(1e-12)
            speeds.append((g / w).sum())
        speed = torch.stack(speeds)
        self.stage("speed", speed)
        for m, s in zip(self.modalities, speed):
            self.record(f"speed/{m}", s)

    def on_step_taken(self) -> None:
        self.feature_mean = self.staged("means")
        speed = self.staged("speed")
        if not self.active:
            return
        self.count += 1
        if self.phase == "measure":
            self.speed_sum = speed if self.speed_sum is None else self.speed_sum + speed
            if self.count >= self.window:
                self.replace = self.decide(self.speed_sum)
                self.phase, self.count, self.speed_sum = "rebalance", 0, None
        elif self.count >= self.window:
            self.phase, self.count = "measure", 0

    def decide(self, speed: Tensor) -> Tensor:
        """``[M]``: 1 for the modalities to replace in the coming re-balancing window."""
        speed = speed.clamp_min(1e-20)
        d = torch.log10(speed.max() / speed.min())
        slow = speed.argmin()
        others = torch.arange(speed.numel(), device=speed.device) != slow
        return (others & (d > self.threshold)).float()
