"""Sample-level and modality-level valuation (Shapley contributions, enhancement of the weak modality)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch
from torch import Tensor
from torch.nn import functional as F

from ..metrics.shapley import MAX_MODALITIES, shapley_values
from ..types import ModelOutput
from ._common import predict_only
from .base import EpochContext, Method, Support, UnsupportedSettingError
from .registry import register_method
from .state import SeededGenerator

LEVELS = ("sample", "modality")
VARIANTS = ("official", "bmm")


def sample_contributions(correct: dict[frozenset, Tensor], modalities, scale: str = "count") -> dict[str, Tensor]:
    """Per-sample Shapley contributions ``phi_m`` ``[B]`` of the game v(S) = w(S) 1[prediction with
    only S is right], v(empty) = 0; ``correct[S]`` (bool ``[B]``) for every non-empty S; w(S) =
    |S| (``scale="count"``, the authors') or 1 (``"one"``, BalanceMM)."""
    any_ = next(iter(correct.values()))
    values = {frozenset(): torch.zeros(any_.shape, dtype=torch.float64, device=any_.device)}
    for s, c in correct.items():
        values[frozenset(s)] = c.to(torch.float64) * (len(s) if scale == "count" else 1.0)
    return shapley_values(values, list(modalities))


def copy_counts(phi: Tensor) -> Tensor:
    """The authors' unimodal copies of a sample from its contribution: 0 if phi >= 1, 1 if
    0.4 < phi < 1, 2 if -0.1 < phi <= 0.4, 3 if phi <= -0.1."""
    return torch.where(phi >= 1, 0, torch.where(phi > 0.4, 1, torch.where(phi > -0.1, 2, 3)))


def enhancement_ratio(gaps: Tensor, variant: str = "official", alpha: float = 1.0) -> float:
    """Delta: the fraction of the training set added as copies. Official (2 modalities):
    alpha (2/3) |gap_1 - gap_2|; BalanceMM: sum over ordered pairs |gap_m - gap_m'| / (M - 1), no alpha."""
    if variant == "official":
        return float(alpha * (2.0 / 3.0) * (gaps[0] - gaps[1]).abs())
    M = gaps.numel()
    return float((gaps.unsqueeze(0) - gaps.unsqueeze(1)).abs().sum() / (M - 1))


@register_method("valuation")
class Valuation(Method):
    """Valuation: Shapley contribution of each modality per sample; extra unimodal copies of low-contributing ones.

    Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality Valuation",
    CVPR 2024 (arXiv 2309.06255); code GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation
    (code/sample_level.py, code/modality_level.py @7ed12b0); BalanceMM "Sample"
    (GeWu-Lab/BalanceBenchmark @4c1482f). The Shapley arithmetic is
    :func:`cggm.diagnostics.shapley.shapley_values`.

    Value of a coalition S for sample i: v(S) = |S| 1[argmax f(S) = y_i], v(empty) = 0, f(S) the
    fused head ``model.predict`` with the features of the modalities outside S set to zero; so
    for two modalities phi_a = 1/2 v({a}) + 1/2 (v({a,v}) - v({v})) and phi_a + phi_v = v(all).
    A copy of sample i "keeping S" is its fused prediction with only the features in S, scored
    by cross-entropy like an ordinary sample; the loss is the mean over originals and copies,

        L = (B CE_fused + sum_copies CE(f(S_copy)_i, y_i)) / (B + #copies).

    ``level="sample"`` (default, the paper's main method): sample i gets c(phi_m,i) copies keeping
    only m (c = 0 if phi >= 1, 1 if 0.4 < phi < 1, 2 if -0.1 < phi <= 0.4, 3 if phi <= -0.1).
    ``level="modality"``: at the end of each epoch e >= warmup - 1 the whole training split is
    valued (eval mode, no grad), phi_bar_m is the mean over floor(rho N) samples drawn with
    replacement (the declared seeded generator), gap_m = 1 - phi_bar_m, Delta = alpha (2/3)
    |gap_1 - gap_2|, and the next epochs add, per batch, Delta B copies (floor, plus one with
    the fractional probability) of samples drawn with replacement, keeping only the modality with
    the larger gap.

    What differs from the authors', because the engine's batches carry no sample index and the
    training set cannot be rebuilt by an epoch hook (``BatchIterator`` fixes the epoch's
    order from (seed, epoch) over the split as given): copies are not appended to the dataset
    but added to the loss of the batch their original is in (same expected number per epoch;
    the number of optimizer steps per epoch does not grow). Sample level: the contributions are
    computed in each training step from that step's features (training mode, the current
    weights, no gradient), not in an eval-mode pass over the training set after the previous
    epoch, so they are not keyed by dataset index; copies are in effect from epoch ``warmup``
    (default 5, the authors' warm-up: valuation after epoch warmup - 1). Modality level: copies
    are drawn from the batch, not from the whole split. Copies reuse the batch's encoder
    features (zeroing a feature after the encoder, as the authors do, so no extra encoder pass).

    ``variant="official"`` (default): two modalities only (the authors' value function and
    thresholds are written for two). ``variant="bmm"`` (BalanceMM): any M (up to 10; 2^M head
    passes), v(S) = 1[correct] (scale 1), the same thresholds on these half-scale values (a
    sample all heads get right receives one copy per modality); modality level Delta = sum over
    ordered pairs |gap_m - gap_m'| / (M - 1) with no alpha, and per drawn sample one copy per
    modality m keeping the modalities with a gap >= gap_m (for M = 2: a weak-only copy plus a
    full duplicate); BalanceMM's default start is epoch 1 (pass ``warmup=1``), its input-level
    zero-fill is replaced by feature zero-fill. Not reproduced: BalanceMM's reuse of the first
    batch's correctness for every batch and its ``pridiction`` typo. Defaults: warmup 5,
    rho (``part_ratio``) 0.2, alpha 1 (authors' scripts). Records ``phi/<m>`` (batch mean),
    ``copies/<m>`` (copies keeping m per sample) and ``delta`` (modality level).
    """

    name = "valuation"
    source = ('Wei, Feng, Wang, Hu, "Enhancing Multimodal Cooperation via Sample-level Modality Valuation", CVPR 2024 '
              "(arXiv 2309.06255); code GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation")
    support = Support(tasks=("classification",), max_modalities=2, epoch_hooks=True,
                      needs="model.predict on zero-filled features; 2^M - 1 extra head passes per step")

    def __init__(self, level: str = "sample", variant: str = "official", warmup: int = 5, part_ratio: float = 0.2,
                 alpha: float = 1.0, seed: int | None = None) -> None:
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"valuation level must be one of {LEVELS}, got {level!r}.")
        if variant not in VARIANTS:
            raise ValueError(f"valuation variant must be one of {VARIANTS}, got {variant!r}.")
        if not 0 < part_ratio <= 1 or not alpha >= 0 or warmup < 0:
            raise ValueError(f"valuation needs 0 < part_ratio <= 1, alpha >= 0, warmup >= 0; got {part_ratio}, "
                             f"{alpha}, {warmup}.")
        self.level, self.variant, self.warmup = level, variant, int(warmup)
        self.part_ratio, self.alpha = float(part_ratio), float(alpha)
        self.scale = "count" if variant == "official" else "one"
        if variant == "bmm":
            self.support = dataclasses.replace(type(self).support, max_modalities=MAX_MODALITIES)
        self.add_state("generator", SeededGenerator(seed))
        self.add_state("delta", None)  # modality level: the enhancement ratio of the last valuation
        self.add_state("keep_sets", None)  # modality level: the copies' kept modalities (indices)
        self.add_state("contributions", None)  # modality level: phi_bar of the last valuation
        self.last_copies: list[tuple[Tensor, tuple[int, ...]]] = []  # this step's copies (sample, kept), for tests

    def check_support(self, num_modalities, task) -> None:
        if self.variant == "official" and num_modalities > 2:
            raise UnsupportedSettingError(
                f"valuation variant='official' is the authors' two-modality method (v(S) = |S| 1[correct] and its "
                f"copy thresholds are written for 2 modalities), got {num_modalities}; variant='bmm' values any M "
                f"(BalanceMM's general Shapley, scale 1).")
        super().check_support(num_modalities, task)

    def setup(self) -> None:
        if not hasattr(self.model, "predict"):
            raise UnsupportedSettingError(
                "valuation values each modality by zeroing the other modalities' features before the fused head: "
                "it needs model.predict(features, masks) (cggm models have it).")

    # -- valuation ------------------------------------------------------------------------------------
    def contributions_of(self, features, masks, target: Tensor, full: Tensor | None = None) -> dict[str, Tensor]:
        """Per-sample contributions ``{m: [B]}`` from detached features (no gradient)."""
        M = len(self.modalities)
        correct = {}
        with torch.no_grad():
            feats = [h.detach() for h in features]
            for k in range(1, M + 1):
                for keep in itertools.combinations(range(M), k):
                    z = full if (full is not None and k == M) else predict_only(self.model, feats, masks, keep)
                    correct[frozenset(self.modalities[i] for i in keep)] = z.detach().argmax(1) == target
        return sample_contributions(correct, self.modalities, self.scale)

    def copies(self, out: ModelOutput, target: Tensor) -> list[tuple[Tensor, tuple[int, ...]]]:
        """This step's copies: (sample indices, kept modality indices) pairs."""
        B = target.shape[0]
        if self.level == "sample":
            phi = self.contributions_of(out.features, out.masks, target, out.prediction)
            result = []
            for i, m in enumerate(self.modalities):
                c = copy_counts(phi[m])
                self.record(f"phi/{m}", phi[m].float().mean())
                self.record(f"copies/{m}", c.float().mean())
                result.append((torch.repeat_interleave(torch.arange(B, device=target.device), c), (i,)))
            return result
        if self.delta is None:
            return []
        g = self.generator.get(torch.device("cpu"))
        want = self.delta * B
        n = int(math.floor(want)) + int(torch.rand((), generator=g) < want - math.floor(want))
        idx = torch.randint(B, (n,), generator=g).to(target.device)
        self.record("delta", torch.tensor(self.delta))
        return [(idx, tuple(keep)) for keep in self.keep_sets]

    def compute_loss(self, out: ModelOutput, target: Tensor, task_loss: Tensor) -> Tensor:
        self.last_copies = []
        if self.epoch < self.warmup:
            return task_loss
        copies = [(idx, keep) for idx, keep in self.copies(out, target) if idx.numel()]
        self.last_copies = copies
        if not copies:
            return task_loss
        B = target.shape[0]
        total, n = task_loss * B, B
        for idx, keep in copies:
            feats = [h[idx] for h in out.features]
            masks = None if out.masks is None else [None if m is None else m[idx] for m in out.masks]
            z = predict_only(self.model, feats, masks, keep)
            total = total + F.cross_entropy(z.float(), target[idx], reduction="sum")
            n += idx.numel()
        return total / n

    def on_epoch_end(self, ctx: EpochContext) -> None:
        if self.level != "modality" or ctx.epoch < self.warmup - 1:
            return
        model = ctx.model
        was_training = model.training
        model.eval()
        phis = []
        try:
            with torch.no_grad():
                for inputs, masks, target in ctx.batches("train"):
                    out = ctx.forward(inputs, masks)
                    phi = self.contributions_of(out.features, out.masks, target, out.prediction)
                    phis.append(torch.stack([phi[m] for m in self.modalities], 1).cpu())
        finally:
            model.train(was_training)
        phis = torch.cat(phis)
        N = phis.shape[0]
        g = self.generator.get(torch.device("cpu"))
        drawn = torch.randint(N, (max(1, int(self.part_ratio * N)),), generator=g)
        self.generator.step_taken(1)  # (an epoch-end draw is never dropped)
        mean = phis[drawn].mean(0)
        gaps = 1.0 - mean
        self.contributions = mean.tolist()
        self.delta = enhancement_ratio(gaps, self.variant, self.alpha)
        if self.variant == "official":
            self.keep_sets = [[int(gaps.argmax())]]
        else:
            self.keep_sets = [[j for j in range(len(self.modalities)) if gaps[j] >= gaps[m]]
                              for m in range(len(self.modalities))]
