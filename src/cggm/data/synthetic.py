"""A built-in synthetic benchmark with an imbalance knob, generated with torch alone.

Each sample has a class ``y`` in ``0..K-1``. Modality ``m`` sees a noisy code of the class:

    x_m = s_m * P_m[c_m] + noise,  noise ~ N(0, I_d)

where ``P_m`` is a random unit-norm prototype per class, and ``c_m = y`` except that for a fraction
``corrupt_m`` of samples ``c_m`` is a random class (the modality is uninformative there). Modality 0
("strong") has signal scale ``s_0 = signal * (1 + imbalance)`` and is corrupted on
``strong_corruption`` of the samples; the other modalities ("weak") have scale ``signal`` and are
never corrupted. So the strong modality is learned fast but cannot be right on its corrupted
samples, where only the weak modalities help: a model that leans on the strong modality
under-trains the weak ones. ``imbalance = 0`` makes all modalities equally easy to learn.

The weak modalities multiply their class code by a random sign per sample, so their class is not
linearly decodable from the raw input: their encoders must learn a non-linear feature, which is
slower. The generator is seeded; the same arguments give the same data.

**Its ceiling is known.** The splits carry their generator (:class:`SyntheticGenerator`), so the
Bayes-optimal classifier is computed exactly: with ``mu_{m,c} = s_m P_m[c]`` and ``phi`` the
standard normal density, the modalities are independent given ``y`` and

    p(x_m | y) = sum over signs sigma of w_sigma [(1 - rho_m) phi(x_m - sigma mu_{m,y})
                                                 + rho_m / K * sum_c phi(x_m - sigma mu_{m,c})]

(``rho_m`` the corruption, ``sigma = +1`` for the strong modality, ``+-1`` with weight 1/2 each for
a weak one). The Bayes rule takes the argmax over ``y`` of the product over the modalities it
sees (uniform prior). ``data.bayes_optimal("test")`` is its accuracy on a split, per modality
and fused; ``data.posterior(inputs)`` the posterior itself; ``data.sample(n, seed)`` fresh
samples of the same distribution (for a ceiling with less sampling error than a split's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..types import Task
from .base import DataError, DataSplits, MultimodalDataset
from .registry import register_dataset


@dataclass(frozen=True)
class SyntheticGenerator:
    """The distribution the synthetic splits are drawn from (see the module docstring)."""

    names: tuple[str, ...]
    means: tuple[Tensor, ...]        # [K, d] per modality: s_m * P_m[c] (float32, as the samples use)
    corruption: tuple[float, ...]    # rho_m: the share of samples whose class code is a random class
    signed: tuple[bool, ...]         # a random sign per sample multiplies the code
    num_classes: int

    def draw(self, n: int, g: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
        """``n`` samples (inputs per modality, labels) from ``g``, in the generator's draw order."""
        k = self.num_classes
        y = torch.randint(0, k, (n,), generator=g)
        inputs = {}
        for name, mu, rho, signed in zip(self.names, self.means, self.corruption, self.signed):
            code = y.clone()
            flip = torch.rand(n, generator=g) < rho
            code[flip] = torch.randint(0, k, (int(flip.sum()),), generator=g)
            signal_part = mu[code]
            if signed:  # a random sign per sample: the class is not linearly decodable from the raw input
                signal_part = signal_part * (torch.randint(0, 2, (n, 1), generator=g) * 2 - 1)
            inputs[name] = (signal_part + torch.randn(n, mu.shape[1], generator=g)).float()
        return inputs, y

    def log_likelihood(self, name: str, x: Tensor) -> Tensor:
        """``log p(x_m | y)`` up to a term that does not depend on ``y``: ``[N, K]``, on ``x``'s device."""
        if name not in self.names:
            raise DataError(f"synthetic: no modality {name!r}; this generator has {list(self.names)}.")
        m = self.names.index(name)
        dtype = torch.float32 if x.device.type == "mps" else torch.float64
        mu = self.means[m].to(device=x.device, dtype=dtype)
        x = torch.as_tensor(x).to(dtype)
        if x.ndim != 2 or x.shape[1] != mu.shape[1]:
            raise DataError(f"synthetic: modality {name!r} takes inputs of shape [N, {mu.shape[1]}], got "
                            f"{tuple(x.shape)}.")
        rho, k = self.corruption[m], self.num_classes
        terms = []
        for sign in ((1.0, -1.0) if self.signed[m] else (1.0,)):
            # log phi(x - sign mu_c) + ||x||^2 / 2 + const
            lc = sign * x @ mu.T - 0.5 * (mu * mu).sum(1)
            clean = lc + (math.log(1 - rho) if rho < 1 else -math.inf)
            if rho > 0:
                terms.append(torch.logaddexp(clean, torch.logsumexp(lc, 1, keepdim=True) + math.log(rho / k)))
            else:
                terms.append(clean)
        return torch.logsumexp(torch.stack(terms), 0) - math.log(len(terms))

    def posterior(self, inputs: Mapping[str, Tensor], modalities: Sequence[str] | None = None) -> Tensor:
        """The exact posterior ``p(y | x_m for m in modalities)`` ``[N, K]`` (default: all modalities of
        the generator; uniform prior), on the inputs' device."""
        modalities = list(self.names if modalities is None else modalities)
        if not modalities:
            raise DataError("synthetic: the posterior needs at least one modality.")
        missing = [m for m in modalities if m not in inputs]
        if missing:
            raise DataError(f"synthetic: the posterior needs inputs for {missing}; got {list(inputs)}.")
        logp = sum(self.log_likelihood(m, inputs[m]) for m in modalities)
        return torch.softmax(logp, dim=1)


@dataclass
class SyntheticSplits(DataSplits):
    """The synthetic splits and the generator they were drawn from: their Bayes-optimal ceiling."""

    generator: SyntheticGenerator | None = None

    def _split(self, split) -> MultimodalDataset:
        if isinstance(split, MultimodalDataset):
            return split
        if split not in ("train", "val", "test"):
            raise DataError(f"synthetic: split must be 'train', 'val', 'test' or a MultimodalDataset, got {split!r}.")
        return getattr(self, split)

    def posterior(self, inputs: Mapping[str, Tensor], modalities: Sequence[str] | None = None) -> Tensor:
        """The exact Bayes posterior ``[N, K]`` of the modalities named (default: all)."""
        return self.generator.posterior(inputs, modalities)

    def bayes_optimal(self, split="test") -> dict[str, float]:
        """Accuracy of the Bayes-optimal rule on a split (``'train'``, ``'val'``, ``'test'`` or a
        :class:`MultimodalDataset` such as :meth:`sample`'s): ``{modality: accuracy with that
        modality alone, ..., 'fused': accuracy with all of them}``. No classifier of these inputs
        does better in expectation; on a finite split it is the ceiling up to sampling error."""
        ds = self._split(split)
        y = ds.target
        out = {m: float((self.posterior(ds.inputs, [m]).argmax(1).to(y.device) == y).double().mean())
               for m in self.generator.names}
        out["fused"] = float((self.posterior(ds.inputs).argmax(1).to(y.device) == y).double().mean())
        return out

    def sample(self, n: int, seed: int = 0) -> MultimodalDataset:
        """``n`` fresh samples of the same distribution (same prototypes, another random stream)."""
        if int(n) < 1:
            raise DataError(f"synthetic: sample needs n >= 1, got {n}.")
        g = torch.Generator().manual_seed(10_000_019 + int(seed))
        inputs, y = self.generator.draw(int(n), g)
        return MultimodalDataset(inputs, y, source=f"synthetic[sample n={int(n)}, seed={int(seed)}]")


@register_dataset("synthetic")
def make_synthetic(
    num_modalities: int = 2,
    num_classes: int = 4,
    dim: int = 16,
    imbalance: float = 3.0,
    signal: float = 0.5,
    strong_corruption: float = 0.25,
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 1000,
    seed: int = 0,
) -> SyntheticSplits:
    if num_modalities < 2:
        raise ValueError(f"num_modalities must be >= 2, got {num_modalities}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}.")
    if imbalance < 0:
        raise ValueError(f"imbalance must be >= 0, got {imbalance}.")
    if not 0 <= strong_corruption < 1:
        raise ValueError(f"strong_corruption must be in [0, 1), got {strong_corruption}.")
    g = torch.Generator().manual_seed(int(seed))
    names = ["strong"] + [f"weak{i}" if num_modalities > 2 else "weak" for i in range(1, num_modalities)]
    protos = [torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * dim ** 0.5
              for _ in names]
    scales = [signal * (1 + imbalance)] + [signal] * (num_modalities - 1)
    gen = SyntheticGenerator(
        names=tuple(names), means=tuple(s * p / dim ** 0.5 * 3 for s, p in zip(scales, protos)),
        corruption=(float(strong_corruption),) + (0.0,) * (num_modalities - 1),
        signed=(False,) + (True,) * (num_modalities - 1), num_classes=num_classes)
    inputs, y = gen.draw(n_train + n_val + n_test, g)
    parts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, None)}
    splits = {
        k: MultimodalDataset({m: x[s] for m, x in inputs.items()}, y[s], source=f"synthetic[{k}]")
        for k, s in parts.items()
    }
    return SyntheticSplits(
        name="synthetic",
        task=Task("classification", num_classes),
        description=f"synthetic, M={num_modalities}, K={num_classes}, imbalance={imbalance}",
        info={"weak_modalities": names[1:], "strong_modality": names[0], "imbalance": imbalance},
        generator=gen,
        **splits,
    )
