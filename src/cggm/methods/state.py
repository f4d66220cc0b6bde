"""State a method declares (:meth:`Method.add_state`) and the base keeps: saved, loaded, moved,
reduced across DDP ranks, advanced when a step is taken and left untouched when it is skipped.

A plain value (a tensor, a number, a list of them) is saved and loaded as it is. An object that
moves with the step derives from :class:`StateItem` and is told by the protocol when a step is
taken (:meth:`StateItem.step_taken`) or dropped (:meth:`StateItem.step_dropped`):

* :class:`AuxModules`: one auxiliary module per modality (unimodal heads, CGGM's classifiers),
  built lazily on the first batch's features with their own optimizer, their gradients averaged
  across ranks and stepped when the model's step is taken, cleared when it is skipped;
* :class:`SeededGenerator`: a random stream seeded identically on every rank, rewound when a step
  is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..optim import build_optimizer


class StateItem:
    """A part of a method's state that moves with the step (see the module docstring)."""

    def step_taken(self, micro_batches: int, scaler: Any = None) -> None:
        """The model's optimizer step was taken (``micro_batches`` losses were accumulated)."""

    def step_dropped(self) -> None:
        """The step was not taken: forget anything this step changed."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class AuxModules(StateItem):
    """One method-owned module per modality, built on the first batch from its features.

    build: ``build(feature, i) -> nn.Module`` for modality ``i`` (a detached feature tensor of the
        first batch, on its device), or ``modules`` given ready-made.
    optimizer, lr, weight_decay, momentum, fused: their optimizer (:func:`cggm.optim.build_optimizer`).
    scaled: their loss is part of the model's (scaled) loss, so with a ``GradScaler`` they step
        through it; ``False``: their loss is a root of its own, never scaled.
    mean_over_micro_batches: divide their gradients by the number of micro-batches before the
        step (a loss of their own, summed over micro-batches, unlike the model's).

    Built under the global RNG, which is then put back, so that building them when a resumed run
    loads their saved weights does not shift the random stream of later steps; a state loaded
    before they exist is applied when they are built.
    """

    def __init__(self, build: Callable[[Tensor, int], nn.Module] | None = None, *,
                 modules: Sequence[nn.Module] | None = None, optimizer: str = "adam", lr: float = 1e-3,
                 weight_decay: float = 0.0, momentum: float = 0.9, fused: bool = False, scaled: bool = True,
                 mean_over_micro_batches: bool = False) -> None:
        if not lr > 0:
            raise ValueError(f"The auxiliary modules' learning rate must be > 0, got {lr}.")
        if weight_decay < 0:
            raise ValueError(f"The auxiliary modules' weight decay must be >= 0, got {weight_decay}.")
        self.build, self.scaled, self.mean_over_micro_batches = build, bool(scaled), bool(mean_over_micro_batches)
        self.options = {"name": optimizer, "lr": float(lr), "weight_decay": float(weight_decay),
                        "momentum": float(momentum), "fused": bool(fused)}
        if optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adam', 'adamw' or 'sgd', got {optimizer!r}.")
        self.modules: nn.ModuleList | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []
        self._pending: Mapping[str, Any] | None = None
        self.on_built: Callable[[nn.ModuleList], None] | None = None  # checks (e.g. shapes), run once built
        if modules is not None:
            self._adopt(nn.ModuleList(modules))

    @property
    def built(self) -> bool:
        return self.modules is not None

    @property
    def has_state(self) -> bool:
        """Built, or a saved state waits to be loaded into them when they are."""
        return self.modules is not None or self._pending is not None

    def ensure(self, features: Sequence[Tensor]) -> nn.ModuleList:
        """The modules, built from ``features`` (one per modality) if they are not yet."""
        if self.modules is None:
            device = features[0].device
            with torch.inference_mode(False), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                built = nn.ModuleList(self.build(h.detach(), i) for i, h in enumerate(features))
            with torch.inference_mode(False):
                self._adopt(built)
        return self.modules

    def _adopt(self, modules: nn.ModuleList) -> None:
        self.modules = modules
        if self.on_built is not None:
            self.on_built(modules)
        self.params = list(modules.parameters())
        o = self.options
        self.optimizer = build_optimizer(o["name"], self.params, o["lr"], weight_decay=o["weight_decay"],
                                         momentum=o["momentum"], fused=o["fused"])
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def step_taken(self, micro_batches: int, scaler: Any = None) -> None:
        if self.optimizer is None:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            if self.mean_over_micro_batches and micro_batches > 1:
                torch._foreach_div_(grads, float(micro_batches))
            distributed.average_gradients(self.params)  # (one collective; nothing in one process)
            if scaler is not None and self.scaled:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        self.zero_grad()

    def step_dropped(self) -> None:
        self.zero_grad()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        if self.modules is None:
            return dict(self._pending) if self._pending is not None else {}
        return {"modules": self.modules.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.modules is None:
            self._pending = dict(state)  # applied when they are built on the first batch
            return
        with torch.inference_mode(False):
            self.modules.load_state_dict(state["modules"])
            self.optimizer.load_state_dict(state["optimizer"])


class SeededGenerator(StateItem):
    """A ``torch.Generator`` on the device of first use, seeded with ``seed`` (default: rank 0's
    ``torch.initial_seed()``, so every DDP rank draws the same stream); rewound when a step that
    drew from it is skipped."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self.generator: torch.Generator | None = None
        self._loaded: Tensor | None = None
        self._step_start: Tensor | None = None

    def get(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            seed = self.seed if self.seed is not None else distributed.broadcast_object(torch.initial_seed())
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(seed) % 2**63)
            if self._loaded is not None:
                self.generator.set_state(self._loaded.cpu())
                self._loaded = None
        if self._step_start is None:
            self._step_start = self.generator.get_state()
        return self.generator

    def step_taken(self, micro_batches: int, scaler: Any = None) -> None:
        self._step_start = None

    def step_dropped(self) -> None:
        if self._step_start is not None:
            self.generator.set_state(self._step_start)
        self._step_start = None

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state() if self.generator is not None else self._loaded}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        gen = state.get("state")
        self.generator, self._loaded = None, (None if gen is None else gen.cpu())
