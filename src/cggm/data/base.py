"""In-memory multimodal datasets, splits, and a resumable, rank-aware batch iterator."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..types import Task


class DataError(ValueError):
    """Input data that cannot be used; the message names the source and the problem."""


class MultimodalDataset(torch.utils.data.Dataset):
    """Tensors per modality (first axis = samples), a target, and optional padding masks.

    Validates on construction: at least 2 modalities, the same number of rows everywhere, at least
    one sample, finite float inputs. ``source`` names where the data came from in error messages.
    """

    def __init__(self, inputs: Mapping[str, Tensor], target: Tensor, masks: Mapping[str, Tensor] | None = None,
                 source: str = "dataset"):
        self.source = source
        self.inputs = {m: torch.as_tensor(x) for m, x in inputs.items()}
        self.target = torch.as_tensor(target)
        self.masks = {m: torch.as_tensor(x).bool() for m, x in (masks or {}).items()}
        self._validate()

    def _validate(self) -> None:
        if len(self.inputs) < 2:
            raise DataError(f"{self.source}: a multimodal dataset needs at least 2 modalities, got {list(self.inputs)}.")
        n = int(self.target.shape[0]) if self.target.ndim else 0
        if n == 0:
            raise DataError(f"{self.source}: the split is empty (0 samples).")
        for name, table in (("modality", self.inputs), ("mask", self.masks)):
            for m, x in table.items():
                if x.ndim == 0 or int(x.shape[0]) != n:
                    raise DataError(f"{self.source}: {name} {m!r} has {x.shape[0] if x.ndim else 0} rows but the "
                                    f"target has {n}; every modality needs one row per sample.")
        for m, x in self.inputs.items():
            if x.is_floating_point():
                bad = ~torch.isfinite(x)
                if bool(bad.any()):
                    row = int(bad.reshape(n, -1).any(dim=1).nonzero()[0, 0])
                    raise DataError(f"{self.source}: modality {m!r} has {int(bad.sum())} NaN/inf values "
                                    f"(first in sample {row}). Clean or impute them before training.")
        if self.target.is_floating_point() and not bool(torch.isfinite(self.target).all()):
            raise DataError(f"{self.source}: the target has NaN/inf values.")

    def check_task(self, task: Task) -> None:
        if task.class_ids:
            if self.target.is_floating_point():
                raise DataError(f"{self.source}: a {task.kind} target must hold integer class ids, got floats.")
            lo, hi = int(self.target.min()), int(self.target.max())
            if lo < 0 or hi >= task.num_outputs:
                raise DataError(f"{self.source}: labels range over [{lo}, {hi}] but the task has "
                                f"{task.num_outputs} classes (valid labels 0..{task.num_outputs - 1}).")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return {m: tuple(x.shape[1:]) for m, x in self.inputs.items()}

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def __getitem__(self, i: int):
        return ({m: x[i] for m, x in self.inputs.items()}, {m: x[i] for m, x in self.masks.items()}, self.target[i])

    def get_batch(self, idx: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        return ({m: x[idx] for m, x in self.inputs.items()}, {m: x[idx] for m, x in self.masks.items()},
                self.target[idx])

    def subset(self, idx, source: str | None = None) -> MultimodalDataset:
        idx = torch.as_tensor(idx)
        inputs, masks, target = self.get_batch(idx)
        return MultimodalDataset(inputs, target, masks, source or self.source)

    def select(self, modalities) -> MultimodalDataset:
        """The same samples with only some modalities (for unimodal baselines and probes)."""
        return MultimodalDataset.__new__(MultimodalDataset)._init_unchecked(
            {m: self.inputs[m] for m in modalities}, self.target, {m: v for m, v in self.masks.items() if m in modalities},
            self.source)

    def _init_unchecked(self, inputs, target, masks, source):
        self.inputs, self.target, self.masks, self.source = dict(inputs), target, dict(masks), source
        return self


@dataclass
class DataSplits:
    """Train / validation / test splits of one dataset and the task they pose."""

    name: str
    task: Task
    train: MultimodalDataset
    val: MultimodalDataset
    test: MultimodalDataset
    description: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in (self.train, self.val, self.test):
            split.check_task(self.task)
            if split.modalities != self.train.modalities:
                raise DataError(f"{self.name}: splits disagree on modalities: {split.modalities} vs "
                                f"{self.train.modalities}.")

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.train.modalities

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.train.input_shapes


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices into parts with the given fractions, stratified by label, reproducibly."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        cuts = np.floor(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for p, chunk in zip(parts, np.split(idx, cuts)):
            p.extend(chunk.tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


class BatchIterator:
    """Batches of a dataset in an order fixed by ``(seed, epoch)``, sharded across DDP ranks.

    ``skip`` batches are skipped at the start (exact mid-epoch resume). Datasets with
    ``get_batch(indices)`` are sliced directly; others are collated item by item.

    Under DDP (``world_size > 1``) the order is padded by wrapping so that every rank gets as many
    samples (training: every rank takes as many steps); ``pad=False`` (evaluation) gives each rank
    samples ``rank, rank + world_size, ...`` only, so that the shards partition the dataset and each
    sample is scored once.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
                 world_size: int = 1, skip: int = 0, drop_last: bool = False, pad: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.seed, self.epoch, self.rank, self.world_size, self.skip = seed, epoch, rank, world_size, skip
        self.drop_last, self.pad = drop_last, pad

    def indices(self) -> Tensor:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.pad:
                per_rank = -(-n // self.world_size)  # pad by wrapping so every rank gets as many samples
                order = torch.cat([order, order[: per_rank * self.world_size - n]])
            order = order[self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        n = len(self.indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor], Tensor]]:
        order = self.indices()
        for b in range(self.skip, len(self)):
            idx = order[b * self.batch_size: (b + 1) * self.batch_size]
            if hasattr(self.dataset, "get_batch"):
                yield self.dataset.get_batch(idx)
            else:
                yield collate([self.dataset[int(i)] for i in idx])


def collate(items):
    inputs = {m: torch.stack([it[0][m] for it in items]) for m in items[0][0]}
    masks = {m: torch.stack([it[1][m] for it in items]) for m in items[0][1]}
    target = torch.stack([torch.as_tensor(it[2]) for it in items])
    return inputs, masks, target
