"""Uni-Modal Teacher (UMT)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..types import ModelOutput
from .base import Method
from .registry import register_method
from .state import AuxModules


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
    optimizer, stepped when the model's step is taken, gradients averaged across DDP ranks) on every
    training batch before distilling from it: an online variant, one run instead of two stages
    (deviation, documented). The teachers are declared state (:class:`~cggm.methods.state.AuxModules`):
    saved and loaded by the base, their gradients dropped on a skipped step. Records ``distill/<m>``
    and ``teacher/<m>``.
    """

    name = "umt"
    source = 'Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning", ICML 2023 (UMT)'

    def __init__(self, lam: float = 1.0, teachers: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
                 teacher_lr: float = 1e-3) -> None:
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"UMT lam must be >= 0, got {lam}.")
        self.lam, self.teacher_lr = float(lam), float(teacher_lr)
        self._given = teachers
        self.online = teachers is None
        self.add_state("teachers", None)  # AuxModules, made at bind
        self._batch: tuple[dict[str, Tensor], dict[str, Tensor]] | None = None

    def setup(self) -> None:
        if self._given is None:
            teachers = [copy.deepcopy(self.model) for _ in self.modalities]
            for t in teachers:
                t.train()
                for p in t.parameters():
                    p.grad = None
        else:
            given = self._given
            if isinstance(given, Mapping):
                missing = [m for m in self.modalities if m not in given]
                if missing:
                    raise ValueError(f"UMT teachers lack modalities {missing}.")
                given = [given[m] for m in self.modalities]
            if len(given) != len(self.modalities):
                raise ValueError(f"UMT got {len(given)} teachers for {len(self.modalities)} modalities.")
            teachers = list(given)
            for t in teachers:
                t.eval()
                t.requires_grad_(False)
        # online teachers' loss is a root of its own (never scaled); frozen teachers never step
        self.teachers = AuxModules(modules=teachers, lr=self.teacher_lr, scaled=False)

    def transform_batch(self, inputs, masks, training):
        if training:
            self._batch = (inputs, masks)
        return inputs, masks

    def _only(self, inputs: dict[str, Tensor], keep: str) -> dict[str, Tensor]:
        return {m: x if m == keep else torch.zeros_like(x) for m, x in inputs.items()}

    def teacher_features(self, target: Tensor) -> list[Tensor]:
        """The teachers' detached features; online teachers also get their loss's gradients here
        (their optimizer steps when the model's step is taken)."""
        if self._batch is None:
            raise RuntimeError("UMT needs the batch's inputs: call method.prepare(inputs, masks) before the forward.")
        inputs, masks = self._batch
        feats = []
        if self.online:
            total = 0.0
            for i, (m, t) in enumerate(zip(self.modalities, self.teachers.modules)):
                out = t(self._only(inputs, m), masks)
                loss = self.task.loss(out.prediction, target)
                self.record(f"teacher/{m}", loss.detach())
                total = total + loss
                feats.append(out.features[i].detach())
            total.backward()
        else:
            with torch.no_grad():
                for i, (m, t) in enumerate(zip(self.modalities, self.teachers.modules)):
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
