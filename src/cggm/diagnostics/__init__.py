"""Diagnostics: utilization probes, modality removal, and plots (matplotlib as an extra)."""

from .probe import encode_split, linear_probe, probe_encoders

__all__ = ["encode_split", "linear_probe", "probe_encoders"]
