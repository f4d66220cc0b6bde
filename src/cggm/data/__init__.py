"""Datasets: the built-in synthetic benchmark, real data shipped in packages, and loaders for the
paper's four datasets in their published formats."""

from . import paper, real, synthetic  # noqa: F401  (register "synthetic", the real and the paper datasets)
from .base import BatchIterator, DataError, DataSplits, MultimodalDataset, stratified_split
from .registry import DATASETS, list_datasets, load_dataset, register_dataset

__all__ = [
    "DATASETS", "BatchIterator", "DataError", "DataSplits", "MultimodalDataset", "list_datasets", "load_dataset",
    "register_dataset", "stratified_split",
]
