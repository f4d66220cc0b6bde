"""MLA: multimodal learning with alternating unimodal adaptation (a shared head, OWM projection)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models.blocks import pool
from ..types import ModelOutput
from .base import Method, Support, UnsupportedSettingError
from .registry import register_method
from .state import AuxModules

PROJECTIONS = ("owm", "bmm", "released")
FUSIONS = ("entropy", "entropy_batch", "fixed")
FIXED_WEIGHTS = {2: (0.55, 0.45), 3: (0.35, 0.25, 0.40)}  # the authors' main.py (av_alpha=0.55) / a, v, t


class SharedHead(nn.Module):
    """One linear head ``g(u) = W u + b`` for every modality; a modality's pooled feature narrower
    than the widest is zero-padded to it (BalanceMM's SharedHead takes max(d_m))."""

    def __init__(self, width: int, num_outputs: int, device: torch.device):
        super().__init__()
        self.width = int(width)
        self.layer = nn.Linear(self.width, num_outputs).to(device)

    def inputs(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        u = pool(h, mask).to(self.layer.weight.dtype)
        return F.pad(u, (0, self.width - u.shape[1])) if u.shape[1] < self.width else u

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.layer(self.inputs(h, mask))


def owm_update(P: Tensor, r: Tensor, alpha: float) -> Tensor:
    """The OWM projector update: ``k = P r^T``, ``P - k k^T / (alpha + r k)``, then ``/ ||.||_F``
    (``r``: a ``[d]`` mean feature)."""
    r = r.reshape(1, -1).to(P.dtype)
    k = P @ r.t()
    P = P - (k @ k.t()) / (alpha + (r @ k))
    return P / torch.linalg.matrix_norm(P)


def project(G: Tensor, P: Tensor, projection: str) -> Tensor:
    """The head weight gradient edit: ``G P^T`` (``owm``), ``G + G P^T`` (``bmm``), ``G`` (``released``)."""
    if projection == "owm":
        return G @ P.t()
    if projection == "bmm":
        return G + G @ P.t()
    return G


def entropy_weights(logits: Sequence[Tensor], batch_level: bool = False) -> Tensor:
    """Fusion weights ``lambda = softmax_m(-e_m)``: per sample ``[B, M]`` (e_m the entropy of
    softmax over classes), or with ``batch_level`` one ``[M]`` vector as the authors' code computes
    it (softmax over the batch dimension, entropy summed over the whole tensor)."""
    if batch_level:
        ents = []
        for z in logits:
            q = z.float().softmax(dim=0)
            ents.append(-(q * q.clamp_min(1e-30).log()).sum())
        return torch.softmax(-torch.stack(ents), dim=0)
    ents = []
    for z in logits:
        p = z.float().softmax(dim=1)
        ents.append(-(p * p.clamp_min(1e-30).log()).sum(dim=1))
    return torch.softmax(-torch.stack(ents, dim=1), dim=1)


@register_method("mla")
class MLA(Method):
    """MLA: alternating unimodal learning through one shared head, its weight gradient OWM-projected; entropy-weighted fusion at test.

    X. Zhang, J. Yoon, M. Bansal, H. Yao. "Multimodal Representation Learning by Alternating
    Unimodal Adaptation". CVPR 2024, arXiv:2311.10707; code
    Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation@ab6c184 (main.py,
    utils/utils.py ``GSPlugin``); toolkit GeWu-Lab/BalanceBenchmark:balancemm/trainer/MLA_trainer.py@4c1482f
    (spec: shared/docs/methods-balancemm.md section 1).

    A shared linear head ``g(u) = W u + b`` (method-owned, its own optimizer; the model's fusion
    and head are not trained or used) sees each modality alone: ``L_m = CE(g(h_m), y)``, h_m the
    pooled feature zero-padded to the widest modality (d). Only phi_m, W and b get L_m's gradient.
    An OWM projector P (d x d, starts at I, never reset, shared by all modalities) protects what
    earlier modalities taught the head: visiting modality m (in order) with r = batch mean of u_m,

        k = P r^T,  P <- (P - k k^T / (alpha_j + r k)) / ||.||_F,  alpha_j = 0.1^(1 + j/J)

    (j the batch index in the epoch, J the number of batches; the very first visit of the run does
    not update P), then W's gradient from L_m is projected (b's is not):
    ``projection="owm"`` (default) G_m P^T, the authors' intended edit; ``"bmm"`` G_m + G_m P^T,
    BalanceMM's; ``"released"`` no projection and no P update: what the authors' released code
    runs (its name test looks for ``module.weight`` on a bare nn.Linear, so the projection never
    executes; their P is also fixed at 512 x 512). ``update_before_project=False`` projects with P
    before it is updated with the current modality (OWM's usual order; both codes update first).

    One optimizer step per batch, not M (the authors take one CE step per modality, each followed
    by an optimizer step, so modality m's step sees the head updated by modalities 1..m-1). Here the
    M visits are summed into one step: L = sum_m L_m; encoder m gets d L_m / d phi_m at the batch's
    head (the encoders are disjoint, so only the head's within-batch updates are not reproduced);
    the head gets sum_m proj(G_m, P_m), each with the projector as it stood at modality m's visit,
    and b's plain sum. With SGD this equals the authors' M steps to first order in the learning rate.
    P advances only when the step is taken.

    Test-time fusion (:meth:`eval_prediction`) of z_m = g(h_m): ``fusion="entropy"`` (default,
    BalanceMM's per-sample reading) argmax sum_m lambda_m z_m with lambda = softmax_m(-e_m), e_m
    the entropy of softmax(z_m) over classes; ``"entropy_batch"`` the authors' code (softmax over
    the batch dimension, one entropy per modality and batch, so weights depend on the batch);
    ``"fixed"`` ``fixed_weights`` (default (0.55, 0.45) for 2 modalities, (0.35, 0.25, 0.40) for 3,
    the authors' values; required otherwise).

    Defaults: head optimizer Adam lr 1e-3 (the library's unimodal-head default; BalanceMM runs
    AdamW lr 1e-3; the authors SGD lr 1e-3 momentum 0.9, with which OWM is designed: Adam's
    per-element scaling partly undoes the projection, ``head_optimizer="sgd"`` for the authors').
    Not reproduced: BalanceMM's crash on the unset ``self.alpha``, its CE on stale outputs outside
    the window, the fixed 512 x 512 P. Unverified: the paper's wording on the update order.
    Records ``L/<m>`` and ``mla/P_trace``.
    """

    name = "mla"
    source = ('Zhang, Yoon, Bansal, Yao, "Multimodal Representation Learning by Alternating Unimodal Adaptation", '
              'CVPR 2024 (arXiv:2311.10707); code Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation')
    support = Support(tasks=("classification",), needs="per-modality vector or sequence features",
                      ddp=False, unused_parameters=True, edits_gradients=True, epoch_hooks=True)

    def __init__(self, projection: str = "owm", fusion: str = "entropy", fixed_weights: Sequence[float] | None = None,
                 update_before_project: bool = True, head_optimizer: str = "adam", head_lr: float = 1e-3,
                 head_weight_decay: float = 0.0, head_momentum: float = 0.9) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"MLA projection must be one of {PROJECTIONS}, got {projection!r}.")
        if fusion not in FUSIONS:
            raise ValueError(f"MLA fusion must be one of {FUSIONS}, got {fusion!r}.")
        self.projection, self.fusion = projection, fusion
        self.fixed_weights = None if fixed_weights is None else tuple(float(a) for a in fixed_weights)
        self.update_before_project = bool(update_before_project)
        self.add_state("head", AuxModules(self._build_head, optimizer=head_optimizer, lr=head_lr,
                                          weight_decay=head_weight_decay, momentum=head_momentum, scaled=True))
        self.add_state("P", None)  # the projector, [d, d] (built with the head)
        self.add_state("calls", 0)  # projector visits so far (the first one does not update P)
        self.add_state("batch_index", 0)  # j: steps taken in this epoch
        self.add_state("num_batches", None)  # J: the epoch's number of batches
        self._width = 0

    def setup(self) -> None:
        if self.fusion == "fixed":
            weights = self.fixed_weights or FIXED_WEIGHTS.get(len(self.modalities))
            if weights is None or len(weights) != len(self.modalities):
                raise UnsupportedSettingError(
                    f"MLA fusion='fixed' needs one weight per modality ({len(self.modalities)}): pass fixed_weights "
                    f"(the authors give them for 2 and 3 modalities only).")
            self.fixed_weights = tuple(weights)

    def _build_head(self, feature: Tensor, i: int) -> nn.Module:
        return SharedHead(self._width, self.task.num_outputs, feature.device)

    def shared_head(self, out: ModelOutput) -> SharedHead:
        if not self.head.built:
            for h in out.features:
                if h.ndim not in (2, 3):
                    raise UnsupportedSettingError(
                        f"MLA's shared head takes vector or sequence features, got shape {tuple(h.shape)}.")
            self._width = max(int(h.shape[-1]) for h in out.features)
        return self.head.ensure(out.features[:1])[0]

    def on_epoch_start(self, ctx) -> None:
        if self.epoch > 0 and self.batch_index > 0:
            self.num_batches = int(self.batch_index)  # J from the epoch just ended
        elif self.num_batches is None:
            self.num_batches = sum(1 for _ in ctx.batches("train"))
        self.batch_index = 0

    def alpha(self) -> float:
        J = max(int(self.num_batches or 1), 1)
        return 0.1 ** (1.0 + min(int(self.batch_index), J) / J)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        head = self.shared_head(out)
        head.train(self.model.training)
        self._inputs = [head.inputs(h, out.mask(i)) for i, h in enumerate(out.features)]
        self._losses = [F.cross_entropy(head.layer(u), target) for u in self._inputs]
        for m, loss_m in zip(self.modalities, self._losses):
            self.record(f"L/{m}", loss_m.detach())
        return torch.stack(self._losses).sum()

    def compute_gradients(self, loss: Tensor) -> None:
        W = self.head.modules[0].layer.weight
        if self.projection == "released":
            loss.backward()
            return
        grads = [torch.autograd.grad(loss_m, W, retain_graph=True)[0] for loss_m in self._losses]
        loss.backward()
        P = torch.eye(W.shape[1], device=W.device, dtype=torch.float32) if self.P is None else self.P.to(W.device)
        calls, alpha, total = int(self.calls), self.alpha(), torch.zeros_like(W)
        for G, u in zip(grads, self._inputs):
            r = u.detach().float().mean(dim=0)
            if self.update_before_project:
                P = owm_update(P, r, alpha) if calls > 0 else P
                total = total + project(G.float(), P, self.projection).to(W.dtype)
            else:
                total = total + project(G.float(), P, self.projection).to(W.dtype)
                P = owm_update(P, r, alpha) if calls > 0 else P
            calls += 1
        W.grad = total
        self.stage("P", P)
        self.record("mla/P_trace", P.trace())
        self._inputs, self._losses = [], []

    def on_step_taken(self) -> None:
        P = self.staged("P")
        if P is not None:
            self.P = P.detach().clone()
            self.calls = int(self.calls) + len(self.modalities)
        self.batch_index = int(self.batch_index) + 1

    def unimodal_logits(self, out: ModelOutput) -> list[Tensor]:
        head = self.shared_head(out)
        head.eval()
        return [head(h, out.mask(i)) for i, h in enumerate(out.features)]

    def eval_prediction(self, out: ModelOutput) -> Tensor:
        logits = self.unimodal_logits(out)
        if self.fusion == "fixed":
            return sum(a * z for a, z in zip(self.fixed_weights, logits))
        lam = entropy_weights(logits, batch_level=self.fusion == "entropy_batch")
        if lam.ndim == 1:
            return sum(lam[m].to(z.dtype) * z for m, z in enumerate(logits))
        return sum(lam[:, m:m + 1].to(z.dtype) * z for m, z in enumerate(logits))
