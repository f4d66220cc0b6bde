"""OPM: on-the-fly prediction modulation (drop the dominant modality's features per sample)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed
from ..types import ModelOutput
from ._common import in_window
from .base import Method, Support
from .mbsd import slice_logits
from .registry import register_method
from .state import SeededGenerator


def opm_drop_probs(scores: Tensor, q_base: float, lam: float) -> tuple[Tensor, Tensor]:
    """From per-modality batch scores ``[M]``: ``rho_m = s_m / sum_{k != m} s_k`` (= s_m / s_m' for
    two modalities), ``r_m = tanh(relu(rho_m - 1))`` and the drop probabilities
    ``q_m = clip(q_base (1 + lam r_m), 0, 1)`` where ``r_m > 0``, else 0. Returns ``(rho, q)``."""
    rho = scores / (scores.sum() - scores).clamp_min(1e-12)
    r = torch.tanh(torch.relu(rho - 1))
    q = torch.where(r > 0, (q_base * (1 + lam * r)).clamp(0.0, 1.0), torch.zeros_like(r))
    return rho, q


def opm_masks(q: Tensor, batch: int, generator: torch.Generator) -> Tensor:
    """``kappa [B, M]``: 1 keeps modality m of sample i, drawn ``Bernoulli(1 - q_m)`` independently."""
    u = torch.rand(batch, q.shape[0], generator=generator, device=generator.device)
    return (u >= q.to(u.device)).to(q.dtype)


@register_method("opm")
class OPM(Method):
    """OPM: zero the dominant modality's features for random samples, more often the more it dominates.

    Y. Wei, D. Hu, H. Du, J.-R. Wen. "On-the-fly Modulation for Balanced Multimodal Learning".
    TPAMI 2024, arXiv:2410.11582; code GeWu-Lab/BML_TPAMI2024:code/models/Classifier.py@4b3aa4f;
    toolkit GeWu-Lab/BalanceBenchmark:balancemm/trainer/OPM_trainer.py@4c1482f (spec:
    shared/docs/methods-balancemm.md section 2; the two codes agree on the equations).

    Per training batch, with unimodal logits z_m (the slices ``W_m h_m + b/M`` of a linear head on
    ``ConcatFusion``; for any other head ``model.predict`` with the other modalities' features
    zeroed), computed without gradient, s_m = sum_i softmax(z_m,i)[y_i] and

        rho_m = s_m / sum_{k != m} s_k,  r_m = tanh(relu(rho_m - 1)),
        q_m   = clip(q_base (1 + lam r_m), 0, 1) if r_m > 0 else 0   (only the dominant modality),

    then with probability ``p_exe`` (one uniform draw per step): kappa_{m,i} ~ Bernoulli(1 - q_m),
    theta = sum_m d_m q_m / sum_m d_m (d_m = feature size per sample),
    h~_{m,i} = kappa_{m,i} h_{m,i} / (1 - theta) for every modality, K = {i : sum_m kappa_{m,i} > 0},
    and the loss is CE over i in K of ``model.predict(h~)``. Not executed, outside the epoch window
    or in evaluation: the ordinary fused loss / prediction. The global 1/(1 - theta) is the
    authors' rescale, not per-modality inverted dropout (E[h~_m] = (1 - q_m)/(1 - theta) h_m).

    Defaults: ``q_base = 0.4``, ``lam = 0.5``, ``p_exe = 0.7`` (official config.py and BalanceMM;
    the official train_opm.sh uses q_base 0.5). ``start_epoch = 6``: the authors' code drops
    nothing for ``epoch <= 5`` (its epochs counted from 0, as ours: unverified beyond the code
    reading); BalanceMM has no warm-up (``start_epoch=0``). M > 2 uses BalanceMM's extension
    rho_m = s_m / sum of the others' scores (rarely > 1, so OPM is then nearly inactive); for M = 2
    it is the paper's s_m / s_m'.

    Defects not reproduced: q and theta are constants here (the scores are computed without
    gradient; the official custom autograd sends theta's value as its gradient into the encoders,
    BalanceMM's plain division the derivative of 1/(1 - theta) into the scores); the unimodal
    scores use the live head weights (official: detached, same values); the official file's
    syntax error, BalanceMM's NaN on an empty K, undefined loss when not executed and call to a
    renamed method. An empty K cannot occur here (only one modality has q > 0); it would give a
    zero loss. Randomness comes from the method's seeded generator (resumed, rewound on a skipped
    step). Records ``opm/executed``, ``opm/q/<m>``, ``opm/kept`` (fraction of samples in K).

    The TPAMI paper's OGM (same repository, code/main.py) equals ``ogm``/``ogm_ge`` (k = 1 -
    tanh(alpha relu(rho)) for the dominant modality, the GE noise), with ``start_epoch=6,
    end_epoch=60`` for its warm-up and window and ``alpha=0.8``; it modulates only 4-D conv
    weights (``ogm`` modulates every encoder parameter, as documented there). Its ``use_OGM_plus``
    option differs and is the registered ``ogm_plus``. The code allows OPM and OGM at once; not
    offered here (one method per run).
    """

    name = "opm"
    source = ('Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024 '
              '(arXiv:2410.11582); code GeWu-Lab/BML_TPAMI2024')
    support = Support(tasks=("classification",), epoch_hooks=True,
                      needs="features zero-fillable before fusion (model.predict); unimodal logits: slices of a "
                            "linear head on ConcatFusion, else zeroed predict")

    def __init__(self, q_base: float = 0.4, lam: float = 0.5, p_exe: float = 0.7, start_epoch: int = 6,
                 end_epoch: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        for n, v in (("q_base", q_base), ("p_exe", p_exe)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"OPM {n} must be in [0, 1], got {v}.")
        if not lam >= 0:
            raise ValueError(f"OPM lam must be >= 0, got {lam}.")
        self.q_base, self.lam, self.p_exe = float(q_base), float(lam), float(p_exe)
        self.start_epoch, self.end_epoch = int(start_epoch), end_epoch
        self.uses_epochs(self.start_epoch, self.end_epoch)
        self.add_state("generator", SeededGenerator(seed))
        self.last_keep: Tensor | None = None  # this step's kappa [B, M] (None: not executed), for inspection

    def setup(self) -> None:
        self.model.predict  # noqa: B018  (late fusion: features are zeroed and re-fused)

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        self.last_keep = None
        if not in_window(self.epoch, self.start_epoch, self.end_epoch):
            return task_loss
        with torch.no_grad():
            detached = ModelOutput(out.prediction, [h.detach() for h in out.features], out.masks)
            probs = [z.float().softmax(1).gather(1, target.long().unsqueeze(1)).squeeze(1)
                     for z in slice_logits(self.model, detached)]
            scores = distributed.all_reduce_sum(torch.stack([p.sum() for p in probs]))
            rho, q = opm_drop_probs(scores, self.q_base, self.lam)
        for i, m in enumerate(self.modalities):
            self.record(f"opm/q/{m}", q[i])
        gen = self.generator.get(torch.device("cpu"))
        executed = bool(torch.rand((), generator=gen) < self.p_exe)
        self.record("opm/executed", torch.tensor(float(executed)))
        if not executed:
            return task_loss
        keep = opm_masks(q.cpu(), target.shape[0], gen).to(target.device)
        self.last_keep = keep
        dims = torch.tensor([float(h[0].numel()) for h in out.features], device=q.device)
        theta = (dims * q).sum() / dims.sum()
        feats = [h * (keep[:, i].to(h.dtype).view(-1, *([1] * (h.ndim - 1))) / (1 - theta).to(h.dtype))
                 for i, h in enumerate(out.features)]
        kept = keep.sum(1) > 0
        self.record("opm/kept", kept.float().mean())
        if not bool(kept.any()):
            return out.prediction.sum() * 0.0
        pred = self.model.predict(feats, out.masks)
        return self.task.loss(pred[kept], target[kept])
