"""Rules that turn the auxiliary classifiers' metrics into CGGM's magnitude factors B (Eq. 6-7).

Both rules take the batch metric epsilon of each modality's classifier (higher is better) as a
``[M]`` tensor and return ``B`` as a ``[M]`` tensor on the same device, without host
synchronisation.

* :class:`PaperRule` is Eq. 6-7 exactly as written, on consecutive batch metrics with
  epsilon^0 = 0::

      delta_i = eps_i^t - eps_i^{t-1}
      B_i     = rho * (sum_k delta_k - delta_i) / (sum_k delta_k + 1e-8)

  The 1e-8 guards the division. Because consecutive batches differ, sum_k delta_k is often 0 or
  negative: B then blows up (|B| ~ 1e5) or turns negative, which flips the sign of an encoder's
  gradient (cggm-spec.md A3). ``PaperRule(rho, formula="official")`` is the published code's
  formula instead (``diff_sum = sum(diff) + 1e-8; coeff = (diff_sum - d) / diff_sum``, then the
  gradient times ``coeff * rho``): its guard is added to the numerator too::

      B_i     = rho * (sum_k delta_k + 1e-8 - delta_i) / (sum_k delta_k + 1e-8)

  so when no classifier's metric changes (every delta 0) B is rho for every encoder, where the
  paper's formula gives 0. ``cggm_official`` (:meth:`CGGM.official`) uses it; ``rule="paper"``
  keeps the formula as written in the paper.

* :class:`RobustRule` (ours) keeps Eq. 7's shape but measures improvement on a smoothed metric
  over a window, and guards the ratio::

      m_i^t   = EMA_beta(eps_i)                            (bias-corrected)
      delta_i = max(m_i^t - m_i^{t-K}, 0)                  (improvement over the last K steps)
      B_i     = rho * (sum_k delta_k - delta_i + tau (M-1)/M) / (sum_k delta_k + tau)

  Adding the pseudo-improvement tau/M to every modality makes the ratio continuous, with no
  division by zero: when nothing improves (sum delta << tau) B tends to the uniform
  rho (M-1)/M, and when improvements dominate tau it is Eq. 7. Bounds that always hold:
  0 <= B_i <= rho and sum_i B_i = rho (M - 1), the same total as Eq. 7.

* :class:`UnderuseRule` (ours) steers by each classifier's smoothed *level* rather than its
  improvement: ``B_i = rho (M-1) softmax_i(-(m_i - mean_k m_k) / T)`` (see the class).

Every rule proposes B without changing its state (:meth:`ImprovementRule.propose`) and moves only
when CGGM accepts the proposal, i.e. when the optimizer step is taken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class ImprovementRule:
    """Turns each step's metrics ``eps`` ``[M]`` into factors ``B`` ``[M]``.

    A rule is pure between steps: :meth:`propose` gives this step's B and the state the rule would
    move to, without changing anything; :meth:`accept` moves to it. CGGM proposes while it computes
    the loss and accepts only when the optimizer step is taken, so a skipped step leaves the rule
    as it was. ``rule(eps)`` does both (propose, then accept) and returns B.

    ``bounded``: whether B stays in a known finite range (then it may also scale updates).
    """

    name = "base"
    bounded = False

    def __init__(self, rho: float):
        if not (rho > 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be a finite number > 0, got {rho}.")
        self.rho = float(rho)

    def propose(self, eps: Tensor) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError

    def accept(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state)

    def __call__(self, eps: Tensor) -> Tensor:
        B, state = self.propose(eps)
        self.accept(state)
        return B

    # (a part's own state: CGGM declares the rule with add_state and the base saves it through this)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PaperRule(ImprovementRule):
    """Eq. 7 on raw consecutive batch metrics, epsilon^0 = 0 (Algorithm 1). Unbounded.

    ``formula``: ``"paper"`` (default), Eq. 7 as the paper writes it, with the guard
    ``denominator_eps`` in the denominator only: ``B_i = rho (S - delta_i) / (S + g)``, S the sum
    of the deltas; ``"official"``, the published code's (``diff_sum = sum(diff) + 1e-8; coeff =
    (diff_sum - d) / diff_sum``, B = coeff * rho, cggm-spec.md A3), whose guard is in the
    numerator too: ``B_i = rho (S + g - delta_i) / (S + g)``. They differ by ``rho g / (S + g)``:
    nothing when the improvements are large, but when no metric changes (S = 0, every delta 0)
    the official B is rho for every encoder and the paper's is 0.
    """

    name = "paper"
    bounded = False
    FORMULAS = ("paper", "official")

    def __init__(self, rho: float, denominator_eps: float = 1e-8, formula: str = "paper"):
        super().__init__(rho)
        if formula not in self.FORMULAS:
            raise ValueError(f"PaperRule formula must be one of {self.FORMULAS}, got {formula!r}.")
        self.denominator_eps = float(denominator_eps)
        self.formula = formula
        self.previous: Tensor | None = None

    def propose(self, eps: Tensor) -> tuple[Tensor, dict[str, Any]]:
        eps = eps.detach().float()
        prev = torch.zeros_like(eps) if self.previous is None else self.previous.to(eps.device)
        delta = eps - prev
        total = delta.sum()
        if self.formula == "official":  # the published code: the guard in the numerator too
            guarded = total + self.denominator_eps
            B = self.rho * (guarded - delta) / guarded
        else:
            B = self.rho * (total - delta) / (total + self.denominator_eps)
        return B, {"previous": eps.clone()}

    # (a part's own state: CGGM declares the rule with add_state and the base saves it through this)
    def state_dict(self):
        return {"previous": self.previous}

    def load_state_dict(self, state):
        self.previous = state.get("previous")


class RobustRule(ImprovementRule):
    """Smoothed, windowed, guarded Eq. 7. See the module docstring for the equations and bounds."""

    name = "robust"
    bounded = True

    def __init__(self, rho: float, beta: float = 0.9, window: int = 20, tau: float = 0.002):
        super().__init__(rho)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}.")
        if int(window) < 1:
            raise ValueError(f"window must be >= 1 step, got {window}.")
        if not (tau > 0 and math.isfinite(tau)):
            raise ValueError(f"tau must be a finite number > 0, got {tau}.")
        self.beta, self.window, self.tau = float(beta), int(window), float(tau)
        self.ema: Tensor | None = None  # [M] biased EMA
        self.history: Tensor | None = None  # [K, M] smoothed metric of the last K steps
        self.steps = 0

    def propose(self, eps: Tensor) -> tuple[Tensor, dict[str, Any]]:
        eps = eps.detach().float()
        ema, smoothed, steps = _smoothed(self.ema, self.steps, self.beta, eps)
        if self.history is None:
            history = smoothed.unsqueeze(0).repeat(self.window, 1)
        else:
            history = self.history.to(eps.device).clone()
        slot = steps % self.window
        delta = (smoothed - history[slot]).clamp_min(0)  # improvement over the window
        history[slot] = smoothed
        total = delta.sum()
        m = eps.numel()
        B = self.rho * (total - delta + self.tau * (m - 1) / m) / (total + self.tau)
        return B, {"ema": ema, "history": history, "steps": steps}

    # (a part's own state: CGGM declares the rule with add_state and the base saves it through this)
    def state_dict(self):
        return {"ema": self.ema, "history": self.history, "steps": self.steps}

    def load_state_dict(self, state):
        self.ema, self.history, self.steps = state.get("ema"), state.get("history"), int(state.get("steps", 0))


class UnderuseRule(ImprovementRule):
    """Ours: steers by *under-use* instead of by the current rate of improvement.

    The robust and paper rules give the larger B to whichever modality improves less *now*, so a
    strong modality that has converged (improvement 0) gets the larger B and a weak one that is
    still improving slowly is slowed (measured: README, "What the options do"). This rule looks at
    each classifier's *level* instead: the modality whose features support a lower classifier
    metric than the others' gets the larger share of B::

        m_i = EMA_beta(eps_i)                         (bias-corrected, higher is better)
        B_i = rho (M - 1) softmax_i(-(m_i - mean_k m_k) / T)

    so ``sum_i B_i = rho (M - 1)`` (as Eq. 7) and ``0 < B_i < rho (M - 1)``; equal levels give the
    uniform ``rho (M - 1) / M``; ``T`` (in the metric's units) sets how sharply a gap in level
    moves B. Bounded and sync-free like the robust rule.
    """

    name = "underuse"
    bounded = True

    def __init__(self, rho: float, beta: float = 0.98, temperature: float = 0.05):
        super().__init__(rho)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}.")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")
        self.beta, self.temperature = float(beta), float(temperature)
        self.ema: Tensor | None = None
        self.steps = 0

    def propose(self, eps: Tensor) -> tuple[Tensor, dict[str, Any]]:
        eps = eps.detach().float()
        ema, level, steps = _smoothed(self.ema, self.steps, self.beta, eps)
        m = eps.numel()
        B = self.rho * (m - 1) * torch.softmax(-(level - level.mean()) / self.temperature, dim=0)
        return B, {"ema": ema, "steps": steps}

    # (a part's own state: CGGM declares the rule with add_state and the base saves it through this)
    def state_dict(self):
        return {"ema": self.ema, "steps": self.steps}

    def load_state_dict(self, state):
        self.ema, self.steps = state.get("ema"), int(state.get("steps", 0))


def _smoothed(ema: Tensor | None, steps: int, beta: float, eps: Tensor) -> tuple[Tensor, Tensor, int]:
    """One step of a bias-corrected EMA of ``eps``: the new (biased) EMA, the corrected value and
    the new step count (the old state is left as it is)."""
    ema = torch.zeros_like(eps) if ema is None else ema.to(eps.device)
    ema = beta * ema + (1 - beta) * eps
    return ema, ema / (1 - beta ** (steps + 1)), steps + 1


RULES = {"paper": PaperRule, "robust": RobustRule, "underuse": UnderuseRule}


def build_rule(name: str, rho: float, **kwargs: Any) -> ImprovementRule:
    if name not in RULES:
        raise ValueError(f"Unknown improvement rule {name!r}; choose one of {sorted(RULES)}.")
    try:
        return RULES[name](rho, **kwargs)
    except TypeError as err:
        raise TypeError(f"Bad options for the {name!r} rule: {err}") from err


def rule_with_rho(rule: str | ImprovementRule, rho: float | None, options: Mapping[str, Any] | None) -> ImprovementRule:
    """The rule, with ``rho`` stored on it only."""
    if isinstance(rule, ImprovementRule):
        if options:
            raise ValueError("rule_options apply to a rule given by name; configure the ImprovementRule object instead.")
        if rho is not None and float(rho) != rule.rho:
            raise ValueError(f"CGGM got rho={rho} and a rule with rho={rule.rho}: rho lives on the rule; give it there.")
        return rule
    rho = 1.3 if rho is None else rho
    if not (rho > 0 and rho < float("inf")):
        raise ValueError(f"CGGM rho must be a finite number > 0, got {rho}.")
    return build_rule(rule, float(rho), **dict(options or {}))
