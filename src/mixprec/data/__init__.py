"""Datasets as train / validation / test splits of tensors.

``load_dataset(name, data_dir)`` is the one entry point; the data directory comes from the
argument or the ``MIXPREC_DATA`` environment variable. Names: ``digits`` (bundled with
scikit-learn), ``mnist``, ``fashion-mnist``, ``cifar10``, ``jets`` and ``npz:PATH``. Loaders never
download unless given ``download=True``; a missing or damaged file is a :class:`DatasetError`
that names it.
"""
from .augment import random_crop_flip
from .base import (DatasetError, Preprocessing, Splits, data_dir_from_env, load_dataset, list_datasets,
                   stratified_split)

__all__ = ["DatasetError", "Preprocessing", "Splits", "data_dir_from_env", "load_dataset", "list_datasets", "random_crop_flip",
           "stratified_split"]
