"""Each modality's exact Shapley contribution to the fused metric.

The modalities are the players of a cooperative game whose value ``v(S)`` is the fused metric (the
task's headline by default) of the model when only the modalities in ``S`` are present and the
others are *masked*. Modality ``m``'s contribution is its Shapley value

    phi_m = sum over S not containing m of |S|! (M - |S| - 1)! / M! * [v(S u {m}) - v(S)],

the average, over the M! orders in which the modalities can be added, of what adding ``m`` changes.
The contributions add up to what the modalities achieve together over the empty coalition,
``sum_m phi_m = v(all) - v(empty)`` (efficiency); two modalities that change every coalition alike
get the same contribution (symmetry), and one that changes none gets 0 (null player).

Every coalition is evaluated exactly, once: 2^M passes over the split, each through the library's
one evaluation path (:func:`cggm.training.evaluation.evaluate`, so a method that predicts
differently at test time is valued as it predicts). ``M`` above :data:`MAX_MODALITIES` is refused.

**Masking** (``masking=``), what "modality m is absent" means:

* ``"mean"`` (default): its *input* is replaced by the training split's mean input, for every
  sample, before the method's ``prepare_eval`` (the same replacement as the removal diagnostic of
  :func:`cggm.report.removal_drops`, so with ``S`` = all but ``m``, ``v(all) - v(S)`` is that
  diagnostic's drop). It needs nothing from the model beyond its forward pass. With standardised
  inputs the mean is about 0, but the mean carries no sample-specific information either way.
* ``"features"``: its *feature* ``h_m`` (the tensor the fusion consumes) is set to zero and the
  prediction recomputed with ``model.predict`` (what OGM-GE, AGM and the valuation paper do). It
  needs ``model.encode`` and ``model.predict``. A zero feature is not always "absent" (a fusion may
  add biases or modality embeddings to it), which is why it is not the default.
* ``"zero"``: its input is set to zero (BalanceMM's choice); zero input is informative for
  un-standardised data (a black image, a silent spectrogram).

For a lower-is-better metric (MAE) the game is played on the metric with its sign flipped, so a
positive contribution always means the modality makes the fused metric better; ``values`` keeps
the metric itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..metrics.shapley import MAX_MODALITIES, shapley_values  # re-exported: the arithmetic lives below methods
from ..types import ModelOutput, Task

#: the masking options of :func:`shapley_contributions`, the default first
MASKINGS = ("mean", "features", "zero")

Coalition = frozenset


@dataclass
class ShapleyResult:
    """What :func:`shapley_contributions` measured.

    ``values[S]``: the fused metric with only the modalities in ``S`` (a frozenset) present.
    ``phi[m]``: modality ``m``'s Shapley contribution, in the metric's units, signed so that
    positive = the modality makes the metric better; they add up to ``v_full - v_empty`` (with the
    sign flipped for a lower-is-better metric). ``v_empty`` / ``v_full``: the metric with every /
    no modality masked."""

    modalities: tuple[str, ...]
    metric: str
    higher_is_better: bool
    masking: str
    split: str
    values: dict[frozenset, float]
    phi: dict[str, float]
    v_empty: float = field(init=False)
    v_full: float = field(init=False)

    def __post_init__(self) -> None:
        self.v_empty = self.values[frozenset()]
        self.v_full = self.values[frozenset(self.modalities)]

    @property
    def shares(self) -> dict[str, float]:
        """``phi_m / sum_k phi_k`` (NaN when the contributions add up to 0)."""
        total = sum(self.phi.values())
        return {m: (v / total if total != 0 else float("nan")) for m, v in self.phi.items()}

    def coalition_name(self, coalition: Iterable[str]) -> str:
        """``"a+b"`` in the model's modality order; ``"{}"`` for the empty coalition."""
        members = [m for m in self.modalities if m in set(coalition)]
        return "+".join(members) if members else "{}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: coalitions are named by :meth:`coalition_name`."""
        return {"modalities": list(self.modalities), "metric": self.metric, "higher_is_better": self.higher_is_better,
                "masking": self.masking, "split": self.split, "phi": dict(self.phi), "shares": self.shares,
                "v_empty": self.v_empty, "v_full": self.v_full,
                "values": {self.coalition_name(s): v for s, v in sorted(self.values.items(),
                                                                         key=lambda kv: (len(kv[0]), self._order(kv[0])))}}

    def _order(self, coalition: frozenset) -> list[int]:
        return [self.modalities.index(m) for m in self.modalities if m in coalition]

    def table(self) -> str:
        """A plain-text table: one row per modality, then the empty and full coalitions."""
        sign = "" if self.higher_is_better else " (sign flipped: positive = lower " + self.metric + ")"
        width = max(12, *(len(m) + 2 for m in self.modalities))
        lines = [f"Shapley contribution to {self.split} {self.metric}{sign}, masking={self.masking!r}",
                 f"{'modality':<{width}}{'phi':>10}{'share':>9}"]
        for m in self.modalities:
            lines.append(f"{m:<{width}}{self.phi[m]:>+10.4f}{self.shares[m]:>9.3f}")
        lines.append(f"{'v(empty)':<{width}}{self.v_empty:>10.4f}")
        lines.append(f"{'v(all)':<{width}}{self.v_full:>10.4f}")
        return "\n".join(lines)


class _PlainEval:
    """The default evaluation path (the fused prediction, no metric of a method's own), for a model
    evaluated without a method."""

    def prepare_eval(self, inputs, masks):
        return inputs, masks

    def eval_prediction(self, out: ModelOutput) -> torch.Tensor:
        return out.prediction

    def eval_metrics(self) -> dict[str, Any]:
        return {}


class _FeatureMasked(nn.Module):
    """``model`` with the features of the modalities outside ``keep`` set to zero before its head."""

    def __init__(self, model: nn.Module, modalities: Sequence[str], keep: frozenset):
        super().__init__()
        self.model, self.modalities, self.keep = model, tuple(modalities), keep

    def forward(self, inputs, masks=None) -> ModelOutput:
        features = self.model.encode(inputs, masks)
        if hasattr(self.model, "modality_masks"):
            feature_masks = self.model.modality_masks(masks)
        else:
            feature_masks = [masks.get(m) for m in self.modalities] if masks else None
        features = [h if m in self.keep else torch.zeros_like(h) for m, h in zip(self.modalities, features)]
        return ModelOutput(self.model.predict(features, feature_masks), features, feature_masks)


def shapley_contributions(model: nn.Module, method, data, task: Task | None = None, *, split: str = "val",
                          masking: str = "mean", metric: str | None = None, batch_size: int = 512,
                          fill: Mapping[str, torch.Tensor] | None = None,
                          device: torch.device | str | None = None) -> ShapleyResult:
    """Each modality's exact Shapley contribution to ``model``'s fused metric (module docstring).

    model: a multimodal model (``model(inputs, masks) -> ModelOutput``; ``masking="features"``
        also needs ``model.encode`` and ``model.predict``), its modalities in ``model.modalities``
        or the data's order.
    method: the bound method whose evaluation path scores the model, or ``None`` for the plain
        fused prediction.
    data: a :class:`~cggm.data.DataSplits` (``split`` names the split, default ``"val"``; the
        ``"mean"`` masking uses the training split's mean), or one split (a
        :class:`~cggm.data.MultimodalDataset`; then ``task`` is required and the ``"mean"``
        masking uses that split's own mean unless ``fill`` gives the replacement inputs).
    metric: default the task's headline (accuracy, MAE, mean Dice).
    fill: per modality, the input that replaces it under ``"mean"`` masking (one sample, broadcast).
    device: default the model's.

    2^M evaluations of the split; more than :data:`MAX_MODALITIES` modalities are refused.
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}.")
    dataset, reference, task, split = _split_of(data, split, task)
    modalities = tuple(getattr(model, "modalities", None) or dataset.modalities)
    _check_model(model, modalities, masking)
    metric = metric or task.headline.name
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    method = method if method is not None else _PlainEval()
    fill = _fill(reference, modalities, masking, fill, batch_size)
    values = _coalition_values(model, method, dataset, task, device, batch_size,
                               modalities=modalities, masking=masking, fill=fill, metric=metric)
    higher = task.higher_is_better(metric)
    sign = 1.0 if higher else -1.0
    phi = shapley_values({s: sign * v for s, v in values.items()}, modalities)
    return ShapleyResult(modalities, metric, higher, masking, split, values, phi)


def _split_of(data, split: str, task: Task | None):
    """``(dataset, reference, task, split)``: the split valued, the one whose mean masks, the task
    and the split's name (``"given"`` for one split passed as it is, unless named)."""
    if hasattr(data, "train") and hasattr(data, "task"):  # DataSplits
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}.")
        return getattr(data, split), data.train, task or data.task, split
    if task is None:
        raise ValueError("shapley_contributions on one split needs task= (a DataSplits carries its own).")
    return data, data, task, split if split != "val" else "given"


def _check_model(model: nn.Module, modalities: tuple[str, ...], masking: str) -> None:
    """Refuses more than :data:`MAX_MODALITIES` modalities, and feature masking of a model without
    ``encode`` and ``predict``."""
    if len(modalities) > MAX_MODALITIES:
        raise ValueError(f"shapley_contributions is exact: 2^M evaluations of the split, {2 ** len(modalities)} for "
                         f"M = {len(modalities)} modalities. It values at most {MAX_MODALITIES} modalities; value "
                         f"groups of modalities instead (e.g. merge inputs into fewer modalities).")
    if masking == "features" and not (hasattr(model, "encode") and hasattr(model, "predict")):
        raise TypeError(f"masking='features' recomputes the prediction from zeroed features: it needs model.encode("
                        f"inputs, masks) and model.predict(features, masks), which {type(model).__name__} lacks. "
                        f"Use masking='mean' (inputs replaced), which needs only the forward pass.")


def _fill(reference, modalities: tuple[str, ...], masking: str, fill: Mapping[str, torch.Tensor] | None,
          batch_size: int) -> Mapping[str, torch.Tensor] | None:
    """Per modality, the input that replaces it when absent (``None`` under feature masking)."""
    from ..data.stream import input_means

    if fill is not None and masking != "mean":
        raise ValueError(f"fill= gives the replacement inputs of masking='mean'; masking={masking!r} takes none.")
    if masking == "mean" and fill is None:
        fill = input_means(reference, modalities, batch_size)  # the removal diagnostic's, without augmentation
    elif masking == "zero":
        fill = {m: torch.zeros(1) for m in modalities}  # broadcast to any input shape
    if masking != "features":
        unknown = sorted(set(modalities) - set(fill))
        if unknown:
            raise ValueError(f"fill has no replacement input for {unknown}.")
    return fill


def _coalition_values(model: nn.Module, method, dataset, task: Task, device, batch_size: int, *,
                      modalities: tuple[str, ...], masking: str, fill, metric: str) -> dict[frozenset, float]:
    """``v(S)`` for every coalition ``S``, smallest first: the metric of one evaluation of the split
    with the modalities outside ``S`` masked."""
    from ..training.evaluation import evaluate, replace_inputs

    values: dict[frozenset, float] = {}
    for k in range(len(modalities) + 1):
        for members in itertools.combinations(modalities, k):
            keep = frozenset(members)
            absent = [m for m in modalities if m not in keep]
            if masking == "features":
                scored, transform = _FeatureMasked(model, modalities, keep), None
            else:
                scored = model
                transform = replace_inputs({m: fill[m] for m in absent}) if absent else None
            metrics = evaluate(scored, method, dataset, task, device, batch_size, transform=transform, shard=False)
            if metric not in metrics:
                raise KeyError(f"the evaluation has no metric {metric!r}; it has {sorted(metrics)}.")
            values[keep] = float(metrics[metric])
    return values
