"""CGGM as parts: the method (:mod:`.method`), its rules (:mod:`.rules`), direction terms
(:mod:`.direction`), metric and where B acts (:mod:`.parts`)."""

from .direction import DirectionTerm, GradientCosine, WeightCosine, gradient_modulation_loss
from .method import CGGM
from .rules import ImprovementRule, PaperRule, RobustRule, UnderuseRule, build_rule

__all__ = ["CGGM", "DirectionTerm", "GradientCosine", "ImprovementRule", "PaperRule", "RobustRule", "UnderuseRule",
           "WeightCosine", "build_rule", "gradient_modulation_loss"]
