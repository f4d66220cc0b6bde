"""Loaders of the audio-visual benchmarks of balanced multimodal learning (OGM-GE, PMR, AGM,
MMPareto, InfoReg, ReconBoost, BalanceBenchmark), registered by name: ``cremad``,
``kinetics_sounds`` and ``ave``. They read the layouts those projects distribute or produce
(frame folders per clip, wav files or pre-computed spectrograms, their list files); Pillow (the
``paper`` extra) is imported only when frames are decoded. ``cggm.data.balance.prepare`` extracts
frames and wav files from the original videos with ffmpeg (optional)."""

from . import ave, cremad, kinetics_sounds  # noqa: F401  (register the datasets)
