"""AMCo: adaptive mask co-optimisation (mask the modality the model depends on, train unimodal CE too)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import distributed
from ..types import ModelOutput
from ._common import in_window
from .base import EpochContext, Method, Support, UnsupportedSettingError
from .mbsd import slice_logits
from .registry import register_method
from .state import SeededGenerator


def amco_shares(logits: list[Tensor]) -> Tensor:
    """``share_m = (1/B) sum_i sum_c softmax(u_i)_(m,c)`` with ``u_i = [z_1,i; ...; z_M,i]`` (one
    softmax across every modality's logits): ``[M]``, summing to 1."""
    p = torch.cat([z.float() for z in logits], dim=1).softmax(dim=1)
    return p.view(p.shape[0], len(logits), -1).sum(2).mean(0)


def amco_pt(progress: float, eps: float) -> float:
    """The masked fraction ``pt = sin(pi/2 * min(eps, l)/eps)`` at progress ``l``."""
    return math.sin(math.pi / 2 * min(eps, max(0.0, progress)) / eps)


def amco_rescale(pt: float) -> float:
    """BalanceMM's rescale of the kept features: ``1/(1 - pt)`` if ``|pt - 1| > 0.1`` else 10."""
    return 1.0 / (1.0 - pt) if abs(pt - 1.0) > 0.1 else 10.0


@register_method("amco")
class AMCo(Method):
    """AMCo: zero a growing random share of the dependent modality's feature dimensions, plus unimodal CE (as BalanceMM codes it).

    Z. Zhou, Y. Liang, Z. Zheng, Y. Xuan, K. Kumada. "Adaptive Mask Co-Optimization for Modal
    Dependence in Multimodal Learning". ICASSP 2023 (doi 10.1109/ICASSP49357.2023.10096641); no
    official code; toolkit GeWu-Lab/BalanceBenchmark (balancemm/trainer/AMCo_trainer.py; spec:
    shared/docs/methods-balancemm.md section 3). UNVERIFIED: the paper's text was not available, and
    BalanceMM has two versions that differ; this is BalanceMM's Version A (until its commit 2f2b8b5),
    whose mask length equals the feature size. Spec confidence: weak.

    With unimodal logits z_m (slices ``W_m h_m + b/M`` of a linear head on ``ConcatFusion``; for any
    other head ``model.predict`` with the other modalities' features zeroed):

    * dependence: u_i = [z_1,i; ...; z_M,i], pi_i = softmax(u_i) (one softmax across modalities),
      share_m = (1/B) sum_i sum_c pi_i,(m,c); D = {m : share_m > sigma}; measured on this step's
      logits (as trained, i.e. masked where masked) and used from the NEXT step; D is emptied at
      each epoch start (BalanceMM HEAD). sigma = 0.5 allows at most one dependent modality.
    * mask: pt = sin(pi/2 min(eps, l)/eps); for m in D, N = floor(pt d_m) of the d_m feature
      dimensions, at random positions (one mask per batch and modality, shared by the samples, from
      the method's seeded generator), are zeroed and the rest scaled by c = 1/(1 - pt) if
      |pt - 1| > 0.1 else 10: h_m <- mask * h_m * c.
    * loss: L = CE(model.predict(h~)) + sum_m CE(z~_m) (the unimodal logits of the masked features),
      in the window [start_epoch, end_epoch]; outside it CE(z) only. Evaluation: no mask.

    The progress l: ``ramp="epochs"`` (default, ours): l = epoch / epochs, the fraction of training
    done at the epoch's start (what the paper's l_t means is unknown). ``ramp="bmm"``: BalanceMM's
    counter, l = 0 at each epoch start and l <- l + epoch/10 after each step, so epoch 0 never masks
    and pt = 1 (every dimension zeroed, times 10) after ceil(3/epoch) steps of every later epoch.
    Defaults sigma 0.5, eps 0.3 (BalanceMM; its ``alpha`` 0.1 is unused). The mask length U is the
    feature size (BalanceMM's U = 512 = its feature size). Not implemented: BalanceMM HEAD's Version
    B (a mask on the slice logits, no rescale, and an extra learned C x C layer its evaluation
    bypasses) and its 2-row mask that only runs on 2 GPUs. Records ``amco/share/<m>``, ``amco/pt``.
    """

    name = "amco"
    source = ('Zhou, Liang, Zheng, Xuan, Kumada, "Adaptive Mask Co-Optimization for Modal Dependence in Multimodal '
              'Learning", ICASSP 2023 (doi 10.1109/ICASSP49357.2023.10096641); no official code: BalanceMM\'s code')
    support = Support(tasks=("classification",), epoch_hooks=True,
                      needs="vector or sequence features (masked along the feature dimension); unimodal logits: "
                            "slices of a linear head on ConcatFusion, else zeroed predict")

    def __init__(self, sigma: float = 0.5, eps: float = 0.3, ramp: str = "epochs", start_epoch: int = 0,
                 end_epoch: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        if ramp not in ("epochs", "bmm"):
            raise ValueError(f"AMCo ramp must be 'epochs' or 'bmm', got {ramp!r}.")
        if not eps > 0:
            raise ValueError(f"AMCo eps must be > 0, got {eps}.")
        self.sigma, self.eps, self.ramp = float(sigma), float(eps), ramp
        self.start_epoch, self.end_epoch = int(start_epoch), end_epoch
        self.add_state("dependent", [])  # D, used by the next step
        self.add_state("counter", 0.0)  # BalanceMM's l (ramp="bmm")
        self.add_state("epochs", 1)  # the run's number of epochs (ramp="epochs")
        self.add_state("generator", SeededGenerator(seed))
        self.last_masks: dict[int, Tensor] = {}  # this step's masks by modality index, for inspection

    def progress(self) -> float:
        return self.counter if self.ramp == "bmm" else self.epoch / max(1, int(self.epochs))

    def on_epoch_start(self, ctx: EpochContext) -> None:
        self.dependent, self.counter, self.epochs = [], 0.0, int(ctx.epochs)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        self.last_masks = {}
        if not in_window(self.epoch, self.start_epoch, self.end_epoch):
            return task_loss
        pt = amco_pt(self.progress(), self.eps)
        feats = list(out.features)
        for m in self.dependent:
            h = feats[m]
            if h.ndim not in (2, 3):
                raise UnsupportedSettingError(f"AMCo masks vector or sequence features; modality {self.modalities[m]!r} "
                                              f"has shape {tuple(h.shape)}.")
            d = h.shape[-1]
            n = int(math.floor(pt * d))
            mask = torch.ones(d, device=h.device, dtype=h.dtype)
            if n:
                mask[torch.randperm(d, generator=self.generator.get(torch.device("cpu")))[:n].to(h.device)] = 0
            self.last_masks[m] = mask
            feats[m] = h * mask * amco_rescale(pt)
        if self.last_masks:
            fused = self.model.predict(feats, out.masks)
            loss = self.task.loss(fused, target)
        else:
            fused, loss = out.prediction, task_loss
        zs = slice_logits(self.model, ModelOutput(fused, feats, out.masks))
        loss = loss + sum(self.task.loss(z, target) for z in zs)
        with torch.no_grad():
            n = torch.tensor(float(target.shape[0]), device=target.device)
            shares = amco_shares([z.detach() for z in zs]) * n
            shares = distributed.all_reduce_sum(torch.cat([shares, n.view(1)]))
            shares = shares[:-1] / shares[-1]
        self.stage("shares", shares)
        for i, m in enumerate(self.modalities):
            self.record(f"amco/share/{m}", shares[i])
        self.record("amco/pt", torch.tensor(pt))
        return loss

    def on_step_taken(self) -> None:
        shares = self.staged("shares")
        if shares is not None:
            self.dependent = [i for i, s in enumerate(shares.tolist()) if s > self.sigma]
        if self.ramp == "bmm":
            self.counter = self.counter + self.epoch / 10
