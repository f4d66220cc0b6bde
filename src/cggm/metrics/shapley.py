"""Exact Shapley values of a cooperative game given by its value on every coalition (pure
arithmetic: no model, data or evaluation; :mod:`cggm.diagnostics.shapley` plays the game of the
modalities of a trained model, :mod:`cggm.methods.valuation` the per-sample one).

Player ``m``'s Shapley value is

    phi_m = sum over S not containing m of |S|! (M - |S| - 1)! / M! * [v(S u {m}) - v(S)],

the average, over the M! orders in which the players can be added, of what adding ``m`` changes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

#: the most modalities valued exactly (2^M evaluations of the split)
MAX_MODALITIES = 10


def shapley_values(values: Mapping[frozenset, float], players: Sequence[str]) -> dict[str, float]:
    """The exact Shapley value of each player of the game ``values`` (a value for every subset of
    ``players``, as frozensets), by the subset formula in the module docstring."""
    players = list(players)
    n = len(players)
    missing = [set(s) for k in range(n + 1) for s in itertools.combinations(players, k) if frozenset(s) not in values]
    if missing:
        raise ValueError(f"shapley_values needs a value for every coalition; missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}.")
    phi = {}
    for m in players:
        others = [p for p in players if p != m]
        total = 0.0
        for k in range(n):
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for s in itertools.combinations(others, k):
                coalition = frozenset(s)
                total += weight * (values[coalition | {m}] - values[coalition])
        phi[m] = total
    return phi
