"""InfoReg: regulating the dominant modality during the prime learning window."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed
from ..types import ModelOutput
from ._common import HeadMethod, others_mean, true_class_prob
from .base import EpochContext, Support
from .registry import register_method


@register_method("inforeg")
class InfoReg(HeadMethod):
    """InfoReg: a proximal pull on the dominant encoder while information is acquired fastest.

    "Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition". CVPR 2025
    (GeWu-Lab; authors' code: GeWu-Lab/InfoReg_CVPR2025).

    * Unimodal heads: method-owned linear heads f_m on the live features; their losses are
      back-propagated with the fused loss (as in the authors' code), L = L_task + sum_m L_m.
    * Score per batch: s_m = mean_i softmax(f_m(x_i))[y_i] (averaged over DDP ranks); the dominant
      modality is argmax_m s_m, with gap d_m = s_m - mean_{j != m} s_j.
    * Prime learning window: the trace of the diagonal Fisher information, estimated as the mean
      over an epoch's steps of sum_{p in encoders} ||g_p||^2, is averaged over the last ``smooth``
      epochs (tr_t); with k_t = (tr_t - tr_{t-1}) / tr_t, regulation stays on while
      k_t > ``threshold`` (it is on until two epochs have been seen), and once off stays off.
    * Regulation (after backward, only the dominant encoder):
      g <- g + beta_m (theta - theta_0),  beta_m = beta * exp(tanh(d_m)),
      theta_0 = the encoder's parameters at the start of the epoch.

    Deviations from the authors' code (audio/visual specific): the Fisher trace is summed over all
    encoders instead of the audio one only, one ``beta`` serves every modality (the code uses 0.95
    for audio and 0.1 for visual), and M > 2 uses the gap to the others' mean. Records
    ``s/<m>``, ``beta/<m>``, and ``fisher``.
    """

    name = "inforeg"
    source = '"Adaptive Unimodal Regulation for Balanced Multimodal Information Acquisition", CVPR 2025; code GeWu-Lab/InfoReg_CVPR2025'
    support = Support(tasks=("classification",), needs="a model that declares modality_parameters()",
                      edits_gradients=True, epoch_hooks=True)

    def __init__(self, beta: float = 0.95, threshold: float = 0.05, smooth: int = 3, head_lr: float = 1e-3,
                 head_weight_decay: float = 0.0) -> None:
        super().__init__(head_lr, head_weight_decay)
        if not beta >= 0 or smooth < 1:
            raise ValueError("InfoReg beta must be >= 0 and smooth >= 1.")
        self.beta, self.threshold, self.smooth = float(beta), float(threshold), int(smooth)
        self.add_state("active", True)
        self.add_state("traces", [])  # the Fisher trace of each epoch
        self.add_state("fisher_sum", None)  # this epoch's steps so far
        self.add_state("fisher_steps", 0)
        self.add_state("anchor", None)  # theta_0 per modality: the encoders at the epoch's start

    def setup(self) -> None:
        self.modality_parameter_groups()

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        logits = self.uni_logits(out, target)
        uni = torch.stack([self.task.loss(z, target) for z in logits])
        with torch.no_grad():
            s = torch.stack([true_class_prob(z.detach(), target).mean() for z in logits])
            s = distributed.weighted_mean(s, target.shape[0])
            dominant = torch.arange(s.numel(), device=s.device) == s.argmax()
            coef = self.beta * torch.exp(torch.tanh(s - others_mean(s))) * dominant.to(s.dtype)
        self.stage("coef", coef)  # used by this step's edit_gradients
        for i, m in enumerate(self.modalities):
            self.record(f"s/{m}", s[i])
            self.record(f"beta/{m}", coef[i] if self.active else torch.zeros_like(coef[i]))
        return task_loss + uni.sum()

    def _snapshot(self) -> list[list[Tensor]]:
        return [[p.detach().clone() for p in ps] for ps in self.modality_parameter_groups()]

    def edit_gradients(self) -> None:
        groups = self.modality_parameter_groups()
        grads = [p.grad for ps in groups for p in ps if p.grad is not None]
        if grads:
            f = torch.stack(torch._foreach_norm(grads)).square().sum()
            self.record("fisher", f)
            self.stage("fisher", f)  # counted when the step is taken
        anchor = self.anchor
        if anchor is None:  # no epoch started: the parameters before this step (kept if it is taken)
            anchor = self._snapshot()
            self.stage("anchor", anchor)
        coef = self.staged("coef")
        if not self.active or coef is None:
            return
        with torch.no_grad():
            for i, (ps, ref) in enumerate(zip(groups, anchor)):
                c = coef[i]
                for p, a in zip(ps, ref):
                    if p.grad is not None:
                        p.grad.add_((p.detach() - a) * c.to(p.dtype))

    def on_step_taken(self) -> None:
        f = self.staged("fisher")
        if f is not None:
            self.fisher_sum = f if self.fisher_sum is None else self.fisher_sum + f
            self.fisher_steps += 1
        if self.anchor is None:
            self.anchor = self.staged("anchor")

    def on_epoch_start(self, ctx: EpochContext) -> None:
        self.anchor = self._snapshot()

    def on_epoch_end(self, ctx: EpochContext) -> None:
        if self.fisher_sum is None:
            return
        self.traces.append(float(self.fisher_sum) / max(self.fisher_steps, 1))
        self.fisher_sum, self.fisher_steps = None, 0
        if len(self.traces) < self.smooth + 1:
            return
        now = sum(self.traces[-self.smooth:]) / self.smooth
        before = sum(self.traces[-self.smooth - 1:-1]) / self.smooth
        k = (now - before) / now if now > 0 else 0.0
        if self.active and k <= self.threshold:
            self.active = False
