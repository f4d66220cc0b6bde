"""Volume Dice: a split of 3D volumes scored slice batch by slice batch, per volume.

:class:`VolumeDice` is fed the predictions of a split's 2D slices in the order of its volumes
(every slice of volume 0, then of volume 1, ...; a batch may end anywhere) and scores each volume
once its last slice arrives: the Dice of each region of the stacked prediction against the whole
volume's ground truth, 1 when both are empty and 0 when only one is, averaged over volumes. It also
keeps the mean slice loss. BraTS's protocol (:mod:`cggm.data.paper.brats`): regions WT (labels 1,
2, 3), TC (1, 3) and ET (3), ground-truth counts of the whole volume (voxels outside the crop count
as missed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from torch import Tensor


def brats_regions_t(labels: Tensor) -> dict[str, Tensor]:
    """BraTS label maps (0..3) to the evaluated regions, as boolean tensors (see
    :func:`cggm.metrics.functional.brats_regions`)."""
    return {"wt": labels > 0, "tc": (labels == 1) | (labels == 3), "et": labels == 3}


class VolumeDice:
    """Per-volume Dice of label regions, averaged over volumes, and the mean slice loss.

    depths: the number of slices of each volume, in the order they are fed.
    truth: per volume, each region's ground-truth voxel count (the whole volume's).
    regions: label map -> ``{region: mask}``; the regions are reported as ``dice_<region>``.

    ``update(prediction, target, loss)`` takes logits ``[B, C, H, W]``, the slices' labels and the
    batch's mean loss; ``compute()`` gives ``loss``, ``dice_<region>``, ``dice_mean`` and ``cases``.
    """

    higher_is_better = True

    def __init__(self, depths: Sequence[int], truth: Sequence[Mapping[str, int]],
                 regions: Callable[[Tensor], dict[str, Tensor]] = brats_regions_t,
                 names: Sequence[str] = ("wt", "tc", "et")) -> None:
        if len(depths) != len(truth):
            raise ValueError(f"VolumeDice got {len(depths)} depths for {len(truth)} volumes.")
        self.depths, self.truth, self.regions, self.names = [int(d) for d in depths], list(truth), regions, tuple(names)
        self.reset()

    def reset(self) -> VolumeDice:
        self.case, self.seen = 0, 0
        self.counts = {r: np.zeros(2, dtype=np.int64) for r in self.names}  # intersection, predicted
        self.per_case: dict[str, list[float]] = {r: [] for r in self.names}
        self.loss_sum, self.n_slices = 0.0, 0
        return self

    def update(self, prediction: Tensor, target: Tensor, loss: Tensor | None = None) -> None:
        if loss is not None:
            self.loss_sum += float(loss) * target.shape[0]
        self.n_slices += int(target.shape[0])
        labels, start = prediction.argmax(dim=1), 0
        while start < target.shape[0]:
            if self.case >= len(self.depths):
                raise ValueError(f"VolumeDice was fed more slices than its {sum(self.depths)}.")
            take = min(int(target.shape[0]) - start, self.depths[self.case] - self.seen)
            truth = self.regions(target[start:start + take])
            for r, pr in self.regions(labels[start:start + take]).items():
                tr = truth[r]
                self.counts[r] += np.array([int((pr & tr).sum()), int(pr.sum())])
            start, self.seen = start + take, self.seen + take
            if self.seen == self.depths[self.case]:
                self._close_case()

    def _close_case(self) -> None:
        for r in self.names:
            inter, p = self.counts[r]
            t = self.truth[self.case][r]
            self.per_case[r].append(1.0 if p + t == 0 else 2.0 * inter / (p + t))
        self.counts = {r: np.zeros(2, dtype=np.int64) for r in self.names}
        self.case, self.seen = self.case + 1, 0

    def compute(self) -> dict[str, float]:
        out = {"loss": self.loss_sum / max(self.n_slices, 1)}
        for r in self.names:
            out[f"dice_{r}"] = float(np.mean(self.per_case[r]))
        out["dice_mean"] = float(np.mean([out[f"dice_{r}"] for r in self.names]))
        out["cases"] = float(len(self.depths))
        return out
