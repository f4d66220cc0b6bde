"""Joint training: the task loss on the fused prediction, no balancing (the paper's Baseline)."""

from __future__ import annotations

from .base import Method
from .registry import register_method

register_method("joint", Method, summary="Joint training: the task loss on the fused prediction, no balancing (the baseline).",
                source="the baseline of every balancing paper")
