"""Uni-Modal Teacher (UMT)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import distributed
from ..types import ModelOutput
from .base import Method
from .registry import register_method


@register_method("umt")
class UMT(Method):
    """UMT: distil each encoder's features from a unimodal teacher.

    C. Du et al. "On Uni-Modal Feature
    Learning in Supervised Multi-Modal Learning". ICML 2023, arXiv:2305.01233.

    With h_m the student's features and t_m those of a unimodal teacher for modality m,

        L = L_task + lam * sum_m MSE(h_m, t_m.detach()).

    Teachers: ``teachers`` may give one trained model per modality (any model with ``encode``
    whose m-th feature matches the student's, e.g. a copy of the model trained with
    ``method="unimodal"``): this is the paper's two-stage protocol and the teachers stay frozen.
    By default (``teachers=None``) the method makes one copy of the student per modality at bind
    time and trains copy m unimodally (other modalities' inputs zeroed, task loss, its own Adam
    optimizer) on every training batch before distilling from it: an online variant, one
    run instead of two stages (deviation, documented). Records ``distill/<m>`` and ``teacher/<m>``.
    """

    name = "umt"

    def __init__(self, lam: float = 1.0, teachers: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
                 teacher_lr: float = 1e-3) -> None:
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"UMT lam must be >= 0, got {lam}.")
        self.lam, self.teacher_lr = float(lam), float(teacher_lr)
        self._given = teachers
        self.teachers: nn.ModuleList | None = None
        self.teacher_opt: torch.optim.Optimizer | None = None
        self.online = teachers is None
        self._batch: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None

    def setup(self) -> None:
        if self._given is None:
            self.teachers = nn.ModuleList(copy.deepcopy(self.model) for _ in self.modalities)
            for t in self.teachers:
                t.train()
                for p in t.parameters():
                    p.grad = None
            self.teacher_opt = torch.optim.Adam(self.teachers.parameters(), lr=self.teacher_lr)
        else:
            given = self._given
            if isinstance(given, Mapping):
                missing = [m for m in self.modalities if m not in given]
                if missing:
                    raise ValueError(f"UMT teachers lack modalities {missing}.")
                given = [given[m] for m in self.modalities]
            if len(given) != len(self.modalities):
                raise ValueError(f"UMT got {len(given)} teachers for {len(self.modalities)} modalities.")
            self.teachers = nn.ModuleList(given)
            for t in self.teachers:
                t.eval()
                t.requires_grad_(False)

    def modules(self) -> Mapping[str, nn.Module]:
        return {"teachers": self.teachers} if self.teachers is not None else {}

    def prepare(self, inputs, masks):
        self._batch = (inputs, masks)
        return inputs, masks

    def _only(self, inputs: dict[str, Tensor], keep: str) -> dict[str, Tensor]:
        return {m: x if m == keep else torch.zeros_like(x) for m, x in inputs.items()}

    def teacher_features(self, target: Tensor) -> list[Tensor]:
        """The teachers' detached features; online teachers also get their loss's gradients here
        (their optimizer steps in :meth:`commit`, when the model's step is taken)."""
        if self._batch is None:
            raise RuntimeError("UMT needs the batch's inputs: call method.prepare(inputs, masks) before the forward.")
        inputs, masks = self._batch
        feats = []
        if self.online:
            total = 0.0
            for i, (m, t) in enumerate(zip(self.modalities, self.teachers)):
                out = t(self._only(inputs, m), masks)
                loss = self.task.loss(out.prediction, target)
                self.record(f"teacher/{m}", loss.detach())
                total = total + loss
                feats.append(out.features[i].detach())
            total.backward()
        else:
            with torch.no_grad():
                for i, (m, t) in enumerate(zip(self.modalities, self.teachers)):
                    feats.append(t.encode(self._only(inputs, m), masks)[i].detach())
        return feats

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        teacher = self.teacher_features(target)
        self._batch = None
        distill = []
        for m, h, t in zip(self.modalities, out.features, teacher):
            d = F.mse_loss(h, t.to(h.dtype))
            self.record(f"distill/{m}", d.detach())
            distill.append(d)
        return task_loss + self.lam * torch.stack(distill).sum()

    def commit(self, scaler=None) -> None:
        if self.online:
            distributed.average_gradients(self.teachers.parameters())
            self.teacher_opt.step()
            self.teacher_opt.zero_grad(set_to_none=True)

    def discard(self) -> None:
        if self.online:
            self.teacher_opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.online:
            state["teachers"] = self.teachers.state_dict()
            state["teacher_opt"] = self.teacher_opt.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.online and "teachers" in state:
            self.teachers.load_state_dict(state["teachers"])
            self.teacher_opt.load_state_dict(state["teacher_opt"])
