"""DI-MML: detached and interactive multimodal learning (two stages, certainty-weighted inference)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ..models.blocks import pool
from ..types import ModelOutput
from ._common import HeadMethod, UniHead
from .base import Support, UnsupportedSettingError
from .registry import register_method
from .state import AuxModules


def effective_dimensions(feats: list[Tensor], labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """The authors' effective dimensions of two modalities' features ``[N, K]``: per modality, class
    means mu_{c,k}; dimension k of sample i votes for argmin_c |h_{i,k} - mu_{c,k}|; a_k = the
    fraction of right votes; top = {k : a_k > mean_k a_k}. Returns (A, V) index tensors:
    A = top_0 minus top_1, V = top_1 minus top_0."""
    tops = []
    for h in feats:
        h = h.float()
        mu = torch.full((num_classes, h.shape[1]), float("inf"), device=h.device)
        for c in range(num_classes):
            sel = labels == c
            if sel.any():
                mu[c] = h[sel].mean(dim=0)
        votes = (h.unsqueeze(1) - mu.unsqueeze(0)).abs().argmin(dim=1)  # [N, K]
        right = (votes == labels.unsqueeze(1)).sum(dim=0)  # a_k = right_k / N, compared exactly in integers:
        tops.append(right * right.numel() > right.sum())  # a_k > mean_k a_k
    A = torch.nonzero(tops[0] & ~tops[1]).flatten()
    V = torch.nonzero(tops[1] & ~tops[0]).flatten()
    return A, V


def duc_loss(h0: Tensor, h1: Tensor, A: Tensor, V: Tensor, tau: float) -> Tensor:
    """L_DUC, unidirectional (teachers stop-gradient, dot products, no normalisation): modality 1's
    features on A against modality 0's (teacher) by InfoNCE over the batch, plus modality 0's on V
    against modality 1's. A term with no dimensions is 0."""
    total = h0.new_zeros((), dtype=torch.float32)
    idx = torch.arange(h0.shape[0], device=h0.device)
    for anchor, teacher, dims in ((h1, h0, A), (h0, h1, V)):
        if dims.numel():
            dims = dims.to(anchor.device)
            logits = anchor[:, dims].float() @ teacher[:, dims].detach().float().t() / tau
            total = total + F.cross_entropy(logits, idx)
    return total


def certainty_weights(logits: list[Tensor], temperature: float) -> Tensor:
    """omega = softmax_k(conf(o_k) / T) per sample, conf = max softmax probability: ``[B, K]``."""
    conf = torch.stack([z.float().softmax(dim=1).max(dim=1).values for z in logits], dim=1)
    return torch.softmax(conf / temperature, dim=1)


@register_method("di_mml")
class DIMML(HeadMethod):
    """DI-MML: modalities trained detached (own heads, a shared head, a contrastive term), then a fusion head on frozen encoders.

    C. Fan, W. Xu, Y. Wang, Z. Liu, Y. Guo (as cited by the spec). "Detached and Interactive
    Multimodal Learning". ACM MM 2024, arXiv:2407.19514; code fanyunfeng-bit/DI-MML@83b9b7a
    (main_CFT.py, main_CFT_stage2.py, loss/contrast_loss.py); not in BalanceMM (spec:
    shared/docs/methods-balancemm.md section 10).

    Stage 1 (epochs < ``stage1_epochs``), the model's fusion and head unused: method-owned heads
    f_m per modality and one shared linear head g (method-owned, its own optimizer) on every
    modality's live feature h_m (pooled),

        L = sum_m CE(f_m(h_m), y) + w sum_m CE(g(h_m), y) + L_DUC   (L_DUC from epoch ``duc_start``).

    At the start of epoch ``duc_start`` (once) the effective dimensions are measured over the
    training split (model in eval mode; :func:`effective_dimensions`): A = dimensions where
    modality 0 classifies well (per-dimension nearest-class-mean accuracy above its mean) and
    modality 1 does not, V the reverse. L_DUC (:func:`duc_loss`) = (1/B) sum_i -log softmax_j
    (<h_1,i[A], sg(h_0,j[A])> / tau)_i + the same with modality 0 anchors on V and modality 1
    teachers: the teacher side gets no gradient.

    Stage 2 (from epoch ``stage1_epochs``): encoders frozen (their features enter detached, so
    they get no gradient), the model's fusion and head trained with CE(model.predict(sg(h)), y);
    f_m and g are not trained. Inference (:meth:`eval_prediction`): o = (f_0(h_0), f_1(h_1),
    fused), omega = softmax_k(conf(o_k) / T) per sample, conf = max softmax; prediction
    sum_k omega_k o_k. Before stage 2 the fused output (an untrained head) is left out of o.

    Defaults: w = 1; tau = 50 and T = 1 (the authors' CREMA-D values; AVE/UCF use tau 10, T 3/1);
    the authors run 150 stage-1 epochs with L_DUC from epoch 20, then 20 stage-2 epochs: here
    ``stage1_epochs=None`` takes the same share of the run, round(epochs * 150 / 170) (at least
    one stage-2 epoch when epochs >= 2), and ``duc_start=None`` round(stage1 * 20 / 150). Heads:
    Adam lr 1e-3 (the library's head default; the authors train all with SGD lr 1e-3).
    Deviations: one run with both stages (the authors use two scripts and reload the stage-1
    model); the effective dimensions are computed in batches in eval mode (the authors use
    batch size 1, the same in eval mode); stage-2 encoders get no gradient but their
    BatchNorm statistics still follow the trainer's train mode (the authors switch them to eval).
    Two modalities with equal feature widths (the dimensions are compared index by index).
    Records ``L/<m>``, ``dimml/duc``, ``dimml/stage``.
    """

    name = "di_mml"
    source = ('Fan, Xu, Wang, Liu, Guo, "Detached and Interactive Multimodal Learning", ACM MM 2024 '
              '(arXiv:2407.19514); code fanyunfeng-bit/DI-MML')
    support = Support(min_modalities=2, max_modalities=2, tasks=("classification",),
                      needs="two modalities with vector or sequence features of equal width",
                      ddp=False, unused_parameters=True, epoch_hooks=True)

    def __init__(self, w: float = 1.0, tau: float = 50.0, temperature: float = 1.0, stage1_epochs: int | None = None,
                 duc_start: int | None = None, head_lr: float = 1e-3, head_weight_decay: float = 0.0) -> None:
        super().__init__(head_lr, head_weight_decay)
        if not tau > 0 or not temperature > 0:
            raise ValueError(f"DI-MML tau and temperature must be > 0, got {tau} and {temperature}.")
        self.w, self.tau, self.temperature = float(w), float(tau), float(temperature)
        self.stage1_option, self.duc_option = stage1_epochs, duc_start
        self.add_state("shared", AuxModules(lambda h, i: UniHead(h, self.task.num_outputs), optimizer="adam",
                                            lr=head_lr, weight_decay=head_weight_decay, scaled=True))
        self.add_state("stage1_epochs", None)
        self.add_state("duc_start", None)
        self.add_state("dims", None)  # {"A": [...], "V": [...]} once measured

    def _check_features(self, out: ModelOutput) -> None:
        shapes = [tuple(h.shape) for h in out.features]
        if any(len(s) not in (2, 3) for s in shapes) or len({s[-1] for s in shapes}) != 1:
            raise UnsupportedSettingError(
                f"DI-MML compares the two modalities' feature dimensions index by index and applies one shared "
                f"head to both: it needs vector or sequence features of equal width, got shapes {shapes}.")

    def resolve_stages(self, epochs: int) -> None:
        if self.stage1_epochs is None:
            s1 = self.stage1_option if self.stage1_option is not None else max(1, round(epochs * 150 / 170))
            if self.stage1_option is None and epochs >= 2:
                s1 = min(s1, epochs - 1)
            self.stage1_epochs = int(s1)
            self.duc_start = int(self.duc_option if self.duc_option is not None else round(s1 * 20 / 150))

    def current_stage(self) -> int:
        """1 (detached training) or 2 (the fusion head on frozen encoders)."""
        return 2 if self.stage1_epochs is not None and self.epoch >= self.stage1_epochs else 1

    def on_epoch_start(self, ctx) -> None:
        self.resolve_stages(ctx.epochs)
        if self.dims is None and self.current_stage() == 1 and self.epoch >= self.duc_start:
            self.dims = self.measure_dimensions(ctx)

    def measure_dimensions(self, ctx) -> dict[str, list[int]]:
        """The effective dimensions over the training split (model in eval mode, no gradient)."""
        model, was = ctx.model, ctx.model.training
        model.eval()
        feats, labels = [[], []], []
        try:
            with torch.no_grad():
                for inputs, masks, target in ctx.batches("train"):
                    out = ctx.forward(inputs, masks)
                    self._check_features(out)
                    for i, h in enumerate(out.features):
                        feats[i].append(pool(h, out.mask(i)).float())
                    labels.append(target)
        finally:
            model.train(was)
        A, V = effective_dimensions([torch.cat(f) for f in feats], torch.cat(labels), self.task.num_outputs)
        return {"A": A.tolist(), "V": V.tolist()}

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        self._check_features(out)
        self.record("dimml/stage", torch.tensor(float(self.current_stage())))
        if self.current_stage() == 2:
            fused = self.model.predict([h.detach() for h in out.features], out.masks)
            return self.task.loss(fused, target)
        uni = self.uni_logits(out, target)
        shared = self.shared.ensure(out.features[:1])[0]
        shared.train(self.model.training)
        loss = task_loss.new_zeros(())
        for i, (m, z) in enumerate(zip(self.modalities, uni)):
            loss_m = F.cross_entropy(z, target)
            self.record(f"L/{m}", loss_m.detach())
            loss = loss + loss_m + self.w * F.cross_entropy(shared(out.features[i], out.mask(i)), target)
        if self.dims is not None and self.epoch >= (self.duc_start or 0):
            h = [pool(x, out.mask(i)) for i, x in enumerate(out.features)]
            dims = [torch.tensor(self.dims[k], dtype=torch.long) for k in ("A", "V")]
            duc = duc_loss(h[0], h[1], dims[0], dims[1], self.tau)
            self.record("dimml/duc", duc.detach())
            loss = loss + duc.to(loss.dtype)
        return loss

    def eval_prediction(self, out: ModelOutput) -> Tensor:
        logits = self.eval_logits(out)
        if self.current_stage() == 2:
            logits = logits + [out.prediction]
        omega = certainty_weights(logits, self.temperature)
        return sum(omega[:, k:k + 1].to(z.dtype) * z for k, z in enumerate(logits))
