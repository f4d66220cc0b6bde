"""Moved to :mod:`cggm.methods.cggm.rules` (kept so that old imports work)."""

from .cggm.rules import ImprovementRule, PaperRule, RobustRule, UnderuseRule, build_rule  # noqa: F401
