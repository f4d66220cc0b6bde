"""Modality-Specific Learning Rates (MSLR)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import distributed
from ._common import predict_only
from .base import EpochContext, Method, Support, UnsupportedSettingError
from .registry import register_method


@register_method("mslr")
class MSLR(Method):
    """Modality-specific learning rates for late fusion.

    Y. Yao, R. Mihalcea. "Modality-specific Learning Rates for Effective Multimodal Additive
    Late-fusion". Findings of ACL 2022 (attribution as in cggm-spec.md 3.1; the CGGM paper gives no
    citation). No official code was found; the dynamic rule below follows the third-party
    description in peers.md 2.2.

    * Static: encoder m trains with learning rate ``lr * lr_scales[m]`` and the fusion + head with
      ``lr * shared_lr_scale``, through :meth:`param_groups` (each group carries ``lr_scale``). The
      paper sets each modality's rate to the best rate of its unimodal model.
    * Dynamic (``dynamic=True``): after each epoch, each modality's unimodal validation accuracy
      acc_m is measured (unimodal prediction = ``model.predict`` with the other modalities'
      features zeroed), and every ``every`` epochs a multiplier is updated

          c_m <- c_m * acc_m(t) / mean(acc_m(t-window) .. acc_m(t-1)).

      The multiplier scales encoder m's *update* after the optimizer step
      (theta <- theta_old + c_m (theta_new - theta_old)), which equals multiplying its learning
      rate for SGD (with or without momentum) and Adam, and leaves the engine's schedulers alone.

    Records ``lr_mult/<modality>``.
    """

    name = "mslr"
    source = 'Yao & Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion", Findings of ACL 2022'
    support = Support(needs="a model that declares modality_parameters(); dynamic=True: classification",
                      param_groups=True, epoch_hooks=True)

    def __init__(self, lr_scales: Mapping[str, float] | Sequence[float] | None = None, shared_lr_scale: float = 1.0,
                 dynamic: bool = True, window: int = 3, every: int = 1) -> None:
        super().__init__()
        if window < 1 or every < 1:
            raise ValueError("MSLR window and every must be >= 1.")
        self.lr_scales_arg = lr_scales
        self.shared_lr_scale = float(shared_lr_scale)
        self.dynamic, self.window, self.every = bool(dynamic), int(window), int(every)
        self.lr_scales: dict[str, float] = {}
        self.add_state("multipliers", [])  # c_m (set at bind)
        self.add_state("history", [])  # each epoch's unimodal validation accuracies

    def setup(self) -> None:
        self.modality_parameter_groups()  # raises if the model cannot split parameters
        s = self.lr_scales_arg
        if s is None:
            scales = {m: 1.0 for m in self.modalities}
        elif isinstance(s, Mapping):
            unknown = set(s) - set(self.modalities)
            if unknown:
                raise ValueError(f"MSLR lr_scales names unknown modalities {sorted(unknown)}; "
                                 f"the model has {list(self.modalities)}.")
            scales = {m: float(s.get(m, 1.0)) for m in self.modalities}
        else:
            if len(s) != len(self.modalities):
                raise ValueError(f"MSLR got {len(s)} lr_scales for {len(self.modalities)} modalities.")
            scales = {m: float(v) for m, v in zip(self.modalities, s)}
        if any(v <= 0 for v in scales.values()) or self.shared_lr_scale <= 0:
            raise ValueError(f"MSLR learning-rate scales must be > 0, got {scales} and {self.shared_lr_scale}.")
        if self.dynamic and not self.task.labels:
            raise UnsupportedSettingError("MSLR(dynamic=True) adapts rates by unimodal accuracy (classification "
                                          "only); use dynamic=False with lr_scales for other tasks.")
        self.lr_scales = scales
        self.multipliers = [1.0] * len(self.modalities)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        groups = [{"params": ps, "lr_scale": self.lr_scales[m]}
                  for m, ps in zip(self.modalities, self.modality_parameter_groups(model)) if ps]
        shared = [p for p in model.shared_parameters() if p.requires_grad]
        if shared:
            groups.append({"params": shared, "lr_scale": self.shared_lr_scale})
        return groups

    def wrap_optimizer_step(self, take_step) -> bool:
        mult = self.multipliers
        for m, c in zip(self.modalities, mult):
            self.record(f"lr_mult/{m}", torch.tensor(c))
        if all(c == 1.0 for c in mult):
            return take_step()
        groups = self.modality_parameter_groups()
        before = [torch._foreach_mul(ps, 1.0) if ps else [] for ps in groups]
        taken = take_step()
        with torch.no_grad():
            for ps, old, c in zip(groups, before, mult):
                if ps and c != 1.0:
                    torch._foreach_sub_(ps, old)
                    torch._foreach_mul_(ps, c)
                    torch._foreach_add_(ps, old)
        return taken

    def unimodal_accuracy(self, ctx: EpochContext) -> list[float]:
        """Each modality's validation accuracy with the other modalities' features zeroed."""
        model = ctx.model
        was = model.training
        model.eval()
        correct = None
        n = 0
        with torch.no_grad():
            for inputs, masks, target in ctx.batches("val"):
                out = ctx.forward(inputs, masks)
                row = torch.stack([
                    (predict_only(model, out.features, out.masks, [i]).argmax(1) == target).float().sum()
                    for i in range(len(self.modalities))])
                correct = row if correct is None else correct + row
                n += int(target.shape[0])
        model.train(was)
        return (correct / max(n, 1)).tolist()

    def on_epoch_end(self, ctx: EpochContext) -> None:
        if not self.dynamic:
            return
        acc = self.unimodal_accuracy(ctx)
        recent = self.history[-self.window:]
        if recent and (ctx.epoch + 1) % self.every == 0:
            for i in range(len(acc)):
                ref = sum(r[i] for r in recent) / len(recent)
                if ref > 0:
                    self.multipliers[i] *= acc[i] / ref
        self.history.append(acc)
        self.multipliers = distributed.broadcast_object(self.multipliers)
