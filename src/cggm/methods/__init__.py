"""Balancing methods under one interface (:class:`Method`) and a registry of them by name."""

from __future__ import annotations

from functools import partial

from . import joint, unimodal  # noqa: F401  (register "joint", "unimodal")
from .base import EpochContext, Method, Support, UnsupportedSettingError
from .cggm import CGGM, gradient_modulation_loss
from .improvement import PaperRule, RobustRule, build_rule
from .registry import METHODS, build_method, list_methods, register_method

# CGGM variants, by name (ablations of the paper's Table 6 and the official-code behaviour)
register_method("cggm_paper", partial(CGGM, rule="paper"))
register_method("cggm_official", CGGM.official)
register_method("cggm_magnitude", partial(CGGM, lam=0.0, direction="off"))
register_method("cggm_direction", partial(CGGM, magnitude=False))

__all__ = [
    "CGGM", "METHODS", "EpochContext", "Method", "PaperRule", "RobustRule", "Support", "UnsupportedSettingError",
    "build_method", "build_rule", "gradient_modulation_loss", "list_methods", "register_method",
]

# the methods CGGM is compared with (cggm-spec.md 3.1, peers.md 2)
from . import agm, gblending, greedy, inforeg, mmpareto, mrd, mslr, ogm_ge, pmr, qmf, reconboost, ume, umt  # noqa: E402,F401,I001
