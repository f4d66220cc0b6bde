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
"""

from __future__ import annotations

import torch

from ..types import Task
from .base import DataSplits, MultimodalDataset
from .registry import register_dataset


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
) -> DataSplits:
    if num_modalities < 2:
        raise ValueError(f"num_modalities must be >= 2, got {num_modalities}.")
    if imbalance < 0:
        raise ValueError(f"imbalance must be >= 0, got {imbalance}.")
    if not 0 <= strong_corruption < 1:
        raise ValueError(f"strong_corruption must be in [0, 1), got {strong_corruption}.")
    g = torch.Generator().manual_seed(int(seed))
    names = ["strong"] + [f"weak{i}" if num_modalities > 2 else "weak" for i in range(1, num_modalities)]
    protos = [torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * dim ** 0.5
              for _ in names]
    n_total = n_train + n_val + n_test
    y = torch.randint(0, num_classes, (n_total,), generator=g)
    inputs = {}
    for m, name in enumerate(names):
        code = y.clone()
        corrupt = strong_corruption if m == 0 else 0.0
        flip = torch.rand(n_total, generator=g) < corrupt
        code[flip] = torch.randint(0, num_classes, (int(flip.sum()),), generator=g)
        scale = signal * (1 + imbalance) if m == 0 else signal
        signal_part = scale * protos[m][code] / dim ** 0.5 * 3
        if m > 0:  # a random sign per sample: the class is not linearly decodable from the raw input
            signal_part = signal_part * (torch.randint(0, 2, (n_total, 1), generator=g) * 2 - 1)
        x = signal_part + torch.randn(n_total, dim, generator=g)
        inputs[name] = x.float()
    parts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, None)}
    splits = {
        k: MultimodalDataset({m: x[s] for m, x in inputs.items()}, y[s], source=f"synthetic[{k}]")
        for k, s in parts.items()
    }
    return DataSplits(
        name="synthetic",
        task=Task("classification", num_classes),
        description=f"synthetic, M={num_modalities}, K={num_classes}, imbalance={imbalance}",
        info={"weak_modalities": names[1:], "strong_modality": names[0], "imbalance": imbalance},
        **splits,
    )
