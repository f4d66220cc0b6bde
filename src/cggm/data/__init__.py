"""Datasets: the built-in synthetic benchmark, real data shipped in packages, loaders for the
paper's four datasets in their published formats, and loaders for the audio-visual benchmarks of
balanced multimodal learning (CREMA-D, Kinetics-Sounds, AVE)."""

from . import balance, paper, real, synthetic  # noqa: F401  (register every dataset)
from .base import BatchIterator, DataError, DataSplits, MultimodalDataset, stratified_split
from .registry import DATASETS, list_datasets, load_dataset, register_dataset

__all__ = [
    "DATASETS", "BatchIterator", "DataError", "DataSplits", "MultimodalDataset", "list_datasets", "load_dataset",
    "register_dataset", "stratified_split",
]
