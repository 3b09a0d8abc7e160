"""Data sets by name, and the batch loader that feeds them to the trainer.

    from distill.data import load_dataset, BatchLoader
    data = load_dataset("mnist")            # downloads and verifies into ~/.cache/distill/data
    loader = BatchLoader(data.train, 128, shuffle=True, mean=data.mean, std=data.std)

Registered data sets: ``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``image-folder``, ``arrays``,
``digits``, ``mnist1d``, ``tinyshakespeare`` and ``text`` (language modelling), ``ml-100k`` (implicit-feedback ranking; see :mod:`distill.tasks.ranking`), and
``mnist-detection`` (MNIST digits on canvases, with boxes; see :mod:`distill.tasks.detection`).
"""

import importlib
import pkgutil

from distill.data.augment import mixup_inputs, normalize, random_crop_flip
from distill.data.interactions import Interactions, leave_one_out
from distill.data.loader import BatchLoader
from distill.data.registry import DATASETS, DataOptions, default_data_dir, load_dataset, register_builder
from distill.data.splits import split_validation
from distill.data.types import ArrayDataset, DataSplits

__all__ = [
    "DATASETS", "DataOptions", "register_builder", "load_dataset", "default_data_dir", "DataSplits", "ArrayDataset", "BatchLoader",
    "split_validation", "random_crop_flip", "normalize", "mixup_inputs", "Interactions", "leave_one_out",
]


def _register_all() -> None:
    """Import every module of this package: each registers its data sets as it is imported (with
    :func:`distill.data.registry.register_builder`), so a new data set is one new file, no list to edit."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_register_all()
