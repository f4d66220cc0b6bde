"""Balancing methods under one interface (:class:`Method`) and a registry of them by name."""

from __future__ import annotations

from functools import partial

from . import joint, unimodal  # noqa: F401  (register "joint", "unimodal")
from .base import EpochContext, Method, ProtocolError, Support, UnsupportedSettingError
from .cggm import CGGM, DirectionTerm, GradientCosine, WeightCosine, gradient_modulation_loss
from .cggm.rules import ImprovementRule, PaperRule, RobustRule, UnderuseRule, build_rule
from .registry import METHODS, build_method, list_methods, register_method

# CGGM variants, by name (ablations of the paper's Table 6 and the official-code behaviour)
# the paper's raw Eq. 7 acts on gradients, before clipping (Eq. 8); on updates its unbounded B is refused
register_method("cggm_paper", partial(CGGM, rule="paper", scale_on="gradient"),
                summary="CGGM with the paper's raw Eq. 7 (unbounded B), B on gradients before clipping (Eq. 8).")
register_method("cggm_official", CGGM.official,
                summary="CGGM as the official code runs it: published Eq. 7, sign-accuracy metric, one-step-late weight cosine.")
# ours: B from each classifier's level relative to the others' (under-use), not from improvement
register_method("cggm_underuse", partial(CGGM, rule="underuse"),
                summary="CGGM with our under-use rule: B from each classifier's smoothed level, not its improvement (ours).")
register_method("cggm_magnitude", partial(CGGM, lam=0.0, direction="off"),
                summary="CGGM's magnitude modulation only (no direction term; the paper's Table 6 ablation).")
register_method("cggm_direction", partial(CGGM, magnitude=False),
                summary="CGGM's direction term only (B not applied to the encoders; the paper's Table 6 ablation).")

__all__ = [
    "CGGM", "METHODS", "DirectionTerm", "EpochContext", "GradientCosine", "ImprovementRule", "Method", "PaperRule",
    "ProtocolError", "RobustRule", "Support", "UnderuseRule", "UnsupportedSettingError", "WeightCosine", "build_method", "build_rule",
    "gradient_modulation_loss", "list_methods", "register_method",
]

# the methods CGGM is compared with (cggm-spec.md 3.1, peers.md 2)
from . import agm, gblending, greedy, inforeg, mmpareto, mrd, mslr, ogm_ge, pmr, qmf, reconboost, ume, umt  # noqa: E402,F401,I001
from . import mmcosine  # noqa: E402,F401,I001
from . import mbsd  # noqa: E402,F401,I001
from . import cml  # noqa: E402,F401,I001
from . import opm  # noqa: E402,F401,I001
from . import mla  # noqa: E402,F401,I001
from . import relearning  # noqa: E402,F401,I001
from . import lfm  # noqa: E402,F401,I001
from . import mses  # noqa: E402,F401,I001
from . import amco  # noqa: E402,F401,I001
from . import valuation  # noqa: E402,F401,I001
from . import di_mml  # noqa: E402,F401,I001
from . import ogm_plus  # noqa: E402,F401,I001
