"""Checks and look-ups of :meth:`Method.bind`: the modality names, and each modality's encoder
parameters (declared to ``bind`` or by ``model.modality_parameters()``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from .. import distributed
from ..types import Task


class UnsupportedSettingError(ValueError):
    """A method was asked to run in a setting it does not support."""


def check_modalities(name: str, model: nn.Module, modalities) -> tuple[str, ...]:
    if modalities is None:
        modalities = getattr(model, "modalities", None)
        if modalities is None:
            raise ValueError(f"{name}.bind(): the model does not declare its modalities; pass them in the "
                             f"order of ModelOutput.features, e.g. bind(model, task, modalities=['audio', 'video']).")
    if isinstance(modalities, str):
        raise TypeError(f"modalities must be a list of names, got the string {modalities!r}.")
    modalities = tuple(modalities)
    if any(not isinstance(m, str) or not m for m in modalities):
        raise TypeError(f"Modality names must be non-empty strings, got {list(modalities)}.")
    dup = sorted({m for m in modalities if modalities.count(m) > 1})
    if dup:
        raise ValueError(f"Duplicate modality names {dup} in {list(modalities)}: every modality needs its own name.")
    return modalities


def check_support(name: str, support, num_modalities: int, task: Task) -> None:
    s = support
    if num_modalities < s.min_modalities or (s.max_modalities is not None and num_modalities > s.max_modalities):
        hi = "any number" if s.max_modalities is None else str(s.max_modalities)
        raise UnsupportedSettingError(f"Method {name!r} supports {s.min_modalities} to {hi} modalities, got {num_modalities}.")
    if not task.one_of(s.tasks):
        raise UnsupportedSettingError(f"Method {name!r} supports tasks {list(s.tasks)}, not {task.kind!r}.")
    if not s.ddp and distributed.is_distributed():
        raise UnsupportedSettingError(
            f"Method {name!r} does not run under DDP: its loss leaves the fused head (or, per stage, some encoders) "
            f"without a gradient, which DDP's gradient reduction cannot handle. Run it in a single process.")


def by_modality(params, modalities: Sequence[str]) -> dict[str, list[nn.Parameter]]:
    """``bind(modality_parameters=...)``: a mapping by name or a sequence in modality order."""
    if isinstance(params, Mapping):
        unknown = sorted(set(params) - set(modalities))
        if unknown:
            raise ValueError(f"modality_parameters names unknown modalities {unknown}; the modalities are "
                             f"{list(modalities)}.")
        return {m: list(ps) for m, ps in params.items()}
    params = list(params)
    if len(params) != len(modalities):
        raise ValueError(f"modality_parameters has {len(params)} groups for {len(modalities)} modalities "
                         f"{list(modalities)}; give one group per modality, in the same order.")
    return {m: list(ps) for m, ps in zip(modalities, params)}


def declared_groups(name: str, model: nn.Module, modalities: Sequence[str], declared) -> list[list[nn.Parameter]]:
    """Each modality's encoder parameters (trainable or not), in modality order; a parameter in two
    modalities' groups is refused."""
    if declared is None:
        if not hasattr(model, "modality_parameters"):
            raise UnsupportedSettingError(
                f"Method {name!r} acts on each modality's encoder parameters: pass "
                f"bind(..., modality_parameters={{'audio': enc_a.parameters(), ...}}) or give the model a "
                f"modality_parameters() method (cggm MultimodalModel does).")
        declared = model.modality_parameters()
    missing = [m for m in modalities if m not in declared]
    if missing:
        raise ValueError(f"No encoder parameters declared for modalities {missing}; declared: {sorted(declared)}.")
    groups = [list(declared[m]) for m in modalities]
    owner: dict[int, str] = {}
    for m, ps in zip(modalities, groups):
        for p in ps:
            other = owner.setdefault(id(p), m)
            if other != m:
                raise ValueError(
                    f"A parameter of shape {tuple(p.shape)} is declared for both {other!r} and {m!r}. "
                    f"{name} scales or edits each modality's parameters by that modality's factor, "
                    f"which is undefined for a shared parameter: declare shared layers in neither "
                    f"modality (they then train like the fusion module).")
    return groups
