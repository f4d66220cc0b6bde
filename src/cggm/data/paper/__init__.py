"""Loaders of the CGGM paper's four datasets in their published formats (registered by name):
``food101``, ``mosi`` / ``mosei``, ``iemocap`` and ``brats``. Optional packages (h5py, nibabel,
transformers, pillow) are imported only when a loader needs them."""

from . import brats, food101, iemocap, mosi  # noqa: F401  (register the datasets)
