"""Diagnostics: utilization probes, modality removal, Shapley contributions, and plots (matplotlib as an extra)."""

from .probe import encode_split, linear_probe, probe_encoders
from .shapley import ShapleyResult, shapley_contributions, shapley_values

__all__ = ["ShapleyResult", "encode_split", "linear_probe", "probe_encoders", "shapley_contributions",
           "shapley_values"]
