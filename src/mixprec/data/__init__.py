"""Datasets as train / validation / test splits of tensors.

``load_dataset(name, data_dir)`` is the one entry point; the data directory comes from the
argument or the ``MIXPREC_DATA`` environment variable.
"""
from .base import DatasetError, Splits, data_dir_from_env, load_dataset, list_datasets

__all__ = ["DatasetError", "Splits", "data_dir_from_env", "load_dataset", "list_datasets"]
