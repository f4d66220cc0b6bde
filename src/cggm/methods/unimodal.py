"""Unimodal training: the same model, trained and evaluated with one modality only.

The other modalities' inputs are replaced by zeros in every batch (training and evaluation), so
the fusion and head can only use the kept modality. This is the paper's "model training only using
one modality" row, under the same architecture as every other method.
"""

from __future__ import annotations

import torch

from .base import Method, Support
from .registry import register_method


@register_method("unimodal")
class Unimodal(Method):
    """Unimodal training: the other modalities' inputs are zeroed in every batch (train and eval).

    The same model, trained and evaluated with one modality only, so the fusion and head can use
    only the kept modality: the paper's "model training only using one modality" row, under the
    same architecture as every other method.

    Args:
        modality: the name (or index) of the modality to keep (default: the first).
    """

    name = "unimodal"
    source = "the CGGM paper's unimodal baseline (Guo et al., NeurIPS 2024, arXiv:2411.01409)"
    support = Support(unused_parameters=True)

    def __init__(self, modality: str | int = 0):
        super().__init__()
        self.keep = modality

    def setup(self) -> None:
        if isinstance(self.keep, int):
            if not 0 <= self.keep < len(self.modalities):
                raise ValueError(f"unimodal: modality index {self.keep} out of range for {list(self.modalities)}.")
            self.keep = self.modalities[self.keep]
        if self.keep not in self.modalities:
            raise ValueError(f"unimodal: unknown modality {self.keep!r}; the model has {list(self.modalities)}.")

    def transform_batch(self, inputs, masks, training):
        return {m: x if m == self.keep else torch.zeros_like(x) for m, x in inputs.items()}, masks
