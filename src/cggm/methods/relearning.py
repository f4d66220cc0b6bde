"""Diagnosing & Re-learning (D&R): clustering-based diagnosis of each modality, soft re-initialisation."""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.blocks import pool
from .base import EpochContext, Method, Support, UnsupportedSettingError
from .binding import declared_groups
from .registry import register_method


def minmax_scale(x: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Every column of ``x`` ``[N, D]`` scaled to ``[low, high]`` (scikit-learn's MinMaxScaler: a
    constant column maps to ``low``)."""
    lo, hi = x.min(0).values, x.max(0).values
    span = hi - lo
    span = torch.where(span == 0, torch.ones_like(span), span)
    return low + (x - lo) / span * (high - low)


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.t() + (c * c).sum(1).unsqueeze(0)).clamp_min(0)


def kmeans(x: Tensor, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300,
           tol: float = 1e-4) -> tuple[Tensor, Tensor, float]:
    """Lloyd's k-means on ``x`` ``[N, D]`` (float64), best of ``n_init`` k-means++ starts drawn from
    a CPU generator seeded with ``seed`` (so a call is a pure function of its arguments, as
    scikit-learn's ``KMeans(random_state=seed)``). Stops when the centres move by at most
    ``tol`` times the mean per-dimension variance (scikit-learn's rule) or after ``max_iter``
    iterations; an empty cluster keeps its centre. Returns (labels ``[N]``, centres, inertia)."""
    x = x.detach().to("cpu", torch.float64)
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least k = {k} samples, got {n}.")
    g = torch.Generator().manual_seed(int(seed))
    threshold = tol * float(x.var(0, unbiased=False).mean())
    best = None
    for _ in range(max(1, int(n_init))):
        # k-means++: the first centre uniformly, each next one with probability proportional to D^2
        centres = [x[int(torch.randint(n, (1,), generator=g))]]
        d2 = _sq_dist(x, centres[0].unsqueeze(0)).squeeze(1)
        for _ in range(1, k):
            if float(d2.sum()) > 0:
                i = int(torch.multinomial(d2 / d2.sum(), 1, generator=g))
            else:
                i = int(torch.randint(n, (1,), generator=g))
            centres.append(x[i])
            d2 = torch.minimum(d2, _sq_dist(x, x[i].unsqueeze(0)).squeeze(1))
        c = torch.stack(centres)
        for _ in range(max_iter):
            labels = _sq_dist(x, c).argmin(1)
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            sums = torch.zeros_like(c).index_add_(0, labels, x)
            new = torch.where(counts.unsqueeze(1) > 0, sums / counts.clamp_min(1).unsqueeze(1), c)
            shift = float(((new - c) ** 2).sum())
            c = new
            if shift <= threshold:
                break
        d = _sq_dist(x, c)
        labels = d.argmin(1)
        inertia = float(d.gather(1, labels.unsqueeze(1)).sum())
        if best is None or inertia < best[2]:
            best = (labels, c, inertia)
    return best


def purity(clusters: Tensor, labels: Tensor) -> float:
    """The fraction of samples whose cluster's majority label is their own label."""
    clusters, labels = clusters.long().cpu(), labels.long().cpu()
    k, c = int(clusters.max()) + 1, int(labels.max()) + 1
    counts = torch.zeros(k * c, dtype=torch.long).index_add_(0, clusters * c + labels, torch.ones_like(labels))
    return float(counts.view(k, c).max(1).values.sum()) / clusters.numel()


def reinit_strength(gap: Tensor, lam: float) -> Tensor:
    """alpha_m = tanh(lam * gap_m)."""
    return torch.tanh(lam * gap)


@register_method("relearning")
class DiagnosingRelearning(Method):
    """D&R: diagnose each encoder by clustering purity (train vs held-out) and softly re-initialise it.

    Wei, Li, Feng, Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024
    (arXiv 2407.09705); code GeWu-Lab/Diagnosing_Relearning_ECCV2024 (code/ours.py @025085e);
    BalanceMM's ReLearning trainer (GeWu-Lab/BalanceBenchmark @4c1482f) agrees on the equations.

    Training is plain joint cross-entropy. At the end of epoch e with e > 0 and e mod T = 0, at
    most N times, for each modality m and for the training and the held-out (``val``) split: the
    features h_m of the whole split (eval mode, no gradient; token features mean-pooled) are
    min-max scaled per dimension to [-1, 1] and clustered by k-means with k = C classes; purity =
    the fraction of samples whose cluster's majority label is theirs. Then

        gap_m = |purity_train,m - purity_val,m|,   alpha_m = tanh(lam * gap_m),
        theta <- alpha_m theta0 + (1 - alpha_m) theta   for every parameter of encoder m,

    theta0 the encoder's weights when the method was bound (declared state, saved with a run).
    The fusion head, buffers (BatchNorm running statistics) and the optimizer state are untouched.

    Defaults are the authors' script's: lam = 3, T (``every``) = 20, N (``times``) = 3. BalanceMM
    uses T = 15, N = 2 (pass them) and, without a validation split, diagnoses on the test set (not
    reproduced: the held-out split here is ``val``). k-means is ours in torch (k-means++ starts,
    Lloyd iterations, scikit-learn's tolerance rule), seeded with ``seed`` = 0 like the authors'
    ``random_state=0``; ``n_init`` = 10 is fixed (scikit-learn's default changed across versions,
    so the authors' effective value is unverified); the clustering therefore matches scikit-learn's
    in partition on well-separated data, not necessarily in every tie. Parameters of encoder m
    come from ``model.modality_parameters()`` (or ``bind(modality_parameters=...)``), not from
    name matching. Keeps ``diagnoses``: per re-initialisation, the epoch, purities and alphas.
    """

    name = "relearning"
    source = ('Wei, Li, Feng, Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning", ECCV 2024 '
              "(arXiv 2407.09705); code GeWu-Lab/Diagnosing_Relearning_ECCV2024")
    support = Support(tasks=("classification",), epoch_hooks=True,
                      needs="per-modality features and each modality's encoder parameters (modality_parameters())")

    def __init__(self, lam: float = 3.0, every: int = 20, times: int = 3, seed: int = 0, n_init: int = 10,
                 heldout: str = "val") -> None:
        super().__init__()
        if not lam >= 0:
            raise ValueError(f"relearning lam must be >= 0, got {lam}.")
        if every < 1 or times < 0:
            raise ValueError(f"relearning needs every >= 1 and times >= 0, got every={every}, times={times}.")
        self.lam, self.every, self.times = float(lam), int(every), int(times)
        self.seed, self.n_init, self.heldout = int(seed), int(n_init), heldout
        self.add_state("init", None)  # theta0: per modality, a list of parameter tensors
        self.add_state("reinits", 0)
        self.add_state("diagnoses", [])

    def setup(self) -> None:
        self._encoders = declared_groups(self.name, self.model, self.modalities, self._declared_params)
        if any(not ps for ps in self._encoders):
            empty = [m for m, ps in zip(self.modalities, self._encoders) if not ps]
            raise UnsupportedSettingError(f"relearning re-initialises each encoder, but {empty} have no parameters.")
        self.init = [[p.detach().clone() for p in ps] for ps in self._encoders]

    def due(self, epoch: int) -> bool:
        """Whether the diagnosis runs at the end of ``epoch``."""
        return epoch > 0 and epoch % self.every == 0 and self.reinits < self.times

    def features(self, ctx: EpochContext, split: str) -> tuple[list[Tensor], Tensor]:
        """Each modality's pooled features of the whole split, and the labels (eval mode, no grad)."""
        model = ctx.model
        was_training = model.training
        model.eval()
        feats: list[list[Tensor]] = [[] for _ in self.modalities]
        ys = []
        try:
            with torch.no_grad():
                for inputs, masks, target in ctx.batches(split):
                    out = ctx.forward(inputs, masks)
                    for i, h in enumerate(out.features):
                        feats[i].append(pool(h, out.mask(i)).float().cpu())
                    ys.append(target.cpu())
        finally:
            model.train(was_training)
        return [torch.cat(f) for f in feats], torch.cat(ys)

    def diagnose(self, ctx: EpochContext) -> tuple[Tensor, Tensor]:
        """Purities ``[2, M]`` (train, held-out) of each modality's clustering."""
        k = self.task.num_outputs
        out = []
        for split in ("train", self.heldout):
            feats, y = self.features(ctx, split)
            out.append([purity(kmeans(minmax_scale(f.double()), k, self.seed, self.n_init)[0], y) for f in feats])
        return torch.tensor(out, dtype=torch.float64)

    @torch.no_grad()
    def relearn(self, alpha: Tensor) -> None:
        """theta <- alpha_m theta0 + (1 - alpha_m) theta, encoder by encoder."""
        for a, ps, ps0 in zip(alpha.tolist(), self._encoders, self.init):
            for p, p0 in zip(ps, ps0):
                p.copy_(a * p0.to(p.device, p.dtype) + (1 - a) * p)

    def on_epoch_end(self, ctx: EpochContext) -> None:
        if not self.due(ctx.epoch):
            return
        pur = self.diagnose(ctx)
        alpha = reinit_strength((pur[0] - pur[1]).abs(), self.lam)
        self.relearn(alpha)
        self.reinits += 1
        self.diagnoses = self.diagnoses + [{"epoch": int(ctx.epoch), "purity_train": pur[0].tolist(),
                                            "purity_heldout": pur[1].tolist(), "alpha": alpha.tolist()}]
