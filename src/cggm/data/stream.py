"""Whole-split reads that work for every dataset kind: in-memory :class:`~cggm.data.base.MultimodalDataset`
(``inputs``/``target`` tensors) and the memory-mapped caches (audio-visual clips, Food-101
features), which only offer ``get_batch`` and cannot be loaded whole.

Diagnostics (removal drops, probes) read the training split as it is, not as training sees it:
:func:`split_batches` turns a dataset's training augmentation off (``augment = False``) while it
reads, so the numbers do not depend on random crops and leave torch's random stream untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor


@contextmanager
def no_augmentation(dataset):
    """``dataset.augment`` set to False inside the block (datasets without it are left alone)."""
    was = getattr(dataset, "augment", None)
    if was:
        dataset.augment = False
    try:
        yield dataset
    finally:
        if was:
            dataset.augment = was


def split_batches(dataset, batch_size: int = 256) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor], Tensor]]:
    """``(inputs, masks, target)`` batches of the whole split, in order, without augmentation."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(dataset)
    with no_augmentation(dataset):
        for start in range(0, n, batch_size):
            yield dataset.get_batch(torch.arange(start, min(n, start + batch_size)))


def split_targets(dataset) -> Tensor:
    """The split's targets in order: ``dataset.target`` where it has one, else read by batches."""
    target = getattr(dataset, "target", None)
    if isinstance(target, Tensor):
        return target
    return torch.cat([y for _, _, y in split_batches(dataset)])


def input_means(dataset, modalities: Sequence[str] | None = None, batch_size: int = 256) -> dict[str, Tensor]:
    """Each modality's mean input over the split, ``[1, *shape]`` float32 (the removal diagnostic's
    replacement). In-memory inputs are averaged directly; memory-mapped ones by batches (float64 sums)."""
    modalities = tuple(modalities if modalities is not None else dataset.modalities)
    inputs = getattr(dataset, "inputs", None)
    if isinstance(inputs, Mapping):
        return {m: inputs[m].float().mean(0, keepdim=True) for m in modalities}
    sums: dict[str, Tensor] = {}
    count = 0
    for batch, _, _ in split_batches(dataset, batch_size):
        for m in modalities:
            s = batch[m].double().sum(0, keepdim=True)
            sums[m] = s if m not in sums else sums[m] + s
        count += len(next(iter(batch.values())))
    if count == 0:
        raise ValueError(f"{getattr(dataset, 'source', type(dataset).__name__)}: the split is empty; no mean input.")
    return {m: (s / count).float() for m, s in sums.items()}
