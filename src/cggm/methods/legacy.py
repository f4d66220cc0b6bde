"""Shims for method subclasses written against the old base (before the declared-state redesign).

Each old spelling still works, with a ``DeprecationWarning`` naming the new one:

=====================================  ===================================================
old                                    new
=====================================  ===================================================
``prepare`` / ``prepare_eval`` hooks   ``transform_batch(inputs, masks, training)``
``update(take_step)``                  ``wrap_optimizer_step(take_step)``
``commit(scaler)``                     ``on_step_taken()`` (own modules: ``add_state`` an ``AuxModules``)
``discard()``                          nothing: the base drops staged values and declared items
``eval_begin/eval_step/eval_end``      ``eval_metrics()``
``edit_gradients`` undeclared          ``Support(edits_gradients=True)``
``on_epoch_start/end`` undeclared      ``Support(epoch_hooks=True)``
``accumulates_gradients = True``       ``Support(accumulates=True)``
``method.on_epoch_start(ctx)`` call    ``method.begin_epoch(ctx)``
=====================================  ===================================================
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from .state import StateItem

#: old hooks that are now phases of the protocol (a subclass defining them is adapted, not refused)
RENAMED = ("prepare", "prepare_eval")


def _warn(cls: type, old: str, new: str) -> None:
    warnings.warn(f"{cls.__name__}.{old} uses the old method base; write {new} instead (see cggm.methods.legacy).",
                  DeprecationWarning, stacklevel=4)


def adapt(cls: type, base: type) -> None:
    """Adapt a subclass that uses old hook names (called by ``Method.__init_subclass__``)."""
    from .protocol import StepProtocol

    d = cls.__dict__
    if "prepare" in d or "prepare_eval" in d:
        _warn(cls, "prepare/prepare_eval", "transform_batch(inputs, masks, training)")
        train = d.get("prepare") or getattr(cls, "_legacy_prepare", None)
        evaluate = d.get("prepare_eval") or getattr(cls, "_legacy_prepare_eval", None)
        cls._legacy_prepare, cls._legacy_prepare_eval = train, evaluate

        def transform_batch(self, inputs, masks, training):
            fn = type(self)._legacy_prepare if training else type(self)._legacy_prepare_eval
            return (inputs, masks) if fn is None else fn(self, inputs, masks)

        cls.transform_batch = transform_batch
        cls.prepare, cls.prepare_eval = StepProtocol.prepare, StepProtocol.prepare_eval
    if "update" in d:
        _warn(cls, "update", "wrap_optimizer_step(take_step)")
        cls.wrap_optimizer_step = d["update"]
    if "commit" in d:
        _warn(cls, "commit", "on_step_taken()")
        commit = d["commit"]
        cls.on_step_taken = lambda self: commit(self, self._step_scaler)
    if "discard" in d:
        _warn(cls, "discard", "nothing (the base drops a skipped step's staged values)")
        cls._legacy_discard = d["discard"]
    if "eval_step" in d or "eval_end" in d:
        _warn(cls, "eval_begin/eval_step/eval_end", "eval_metrics()")
        cls.eval_metrics = lambda self: {"": _LegacyEval(self)}
    support, changes = cls.support, {}
    if any(h in d for h in ("edit_gradients", "compute_gradients")) and not support.edits_gradients:
        _warn(cls, "edit_gradients", "a declaration, Support(edits_gradients=True)")
        changes["edits_gradients"] = True
        changes["accumulates"] = bool(getattr(cls, "accumulates_gradients", False))
    if any(h in d for h in ("on_epoch_start", "on_epoch_end")) and not support.epoch_hooks:
        _warn(cls, "on_epoch_start/on_epoch_end", "a declaration, Support(epoch_hooks=True)")
        changes["epoch_hooks"] = True
    if changes:
        cls.support = dataclasses.replace(support, **changes)


class LegacyDrop(StateItem):
    """Calls an old-style ``discard()`` when a step is dropped."""

    def __init__(self, method: Any) -> None:
        self.method = method

    def step_dropped(self) -> None:
        type(self.method)._legacy_discard(self.method)


class _LegacyEval:
    """An old-style ``eval_begin/eval_step/eval_end`` as an evaluation metric."""

    def __init__(self, method: Any) -> None:
        self.method = method

    def reset(self) -> _LegacyEval:
        self.method.eval_begin()
        return self

    def update(self, out, target) -> None:
        self.method.eval_step(out, target)

    def compute(self) -> dict[str, float]:
        return self.method.eval_end()


class LegacyHooks:
    """No-op old hooks, so that an old subclass's ``super().commit(scaler)`` and the like still run."""

    def commit(self, scaler: Any = None) -> None:
        """Deprecated: see :meth:`cggm.methods.base.Method.on_step_taken`."""

    # (the shim of the old hook, which old subclasses' super().discard() still calls)
    def discard(self) -> None:
        """Deprecated: the base drops a skipped step's staged values."""

    def eval_begin(self) -> None:
        """Deprecated: see :meth:`cggm.methods.base.Method.eval_metrics`."""

    def eval_step(self, out: Any, target: Any) -> None:
        """Deprecated: see :meth:`cggm.methods.base.Method.eval_metrics`."""

    def eval_end(self) -> dict[str, float]:
        """Deprecated: see :meth:`cggm.methods.base.Method.eval_metrics`."""
        return {}
