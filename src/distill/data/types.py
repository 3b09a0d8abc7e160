"""The in-memory shapes every data set is delivered in."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


#: the target of a training sample without a label (an unlabelled transfer set, ``data.labelled``):
#: label losses skip it (PyTorch's cross-entropy ``ignore_index``), teacher terms read it
UNLABELLED = -100


@dataclass
class ArrayDataset:
    """Samples held as tensors.

    ``inputs``: ``[N, ...]``; ``uint8`` for images (``[N, C, H, W]``, scaled to [0, 1] and
    normalised by the batch loader) or ``float32`` for vectors and sequences.
    ``targets``: ``[N]`` ``int64`` class indices.
    """

    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(
                f"inputs and targets differ in length: {len(self.inputs)} vs {len(self.targets)}"
            )

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: torch.Tensor) -> "ArrayDataset":
        return ArrayDataset(self.inputs[index], self.targets[index])


@dataclass
class DataSplits:
    """A data set ready for training: train and test splits plus what models need to know.

    ``input_shape`` excludes the batch dimension (``(1, 28, 28)``, ``(40,)``).
    ``mean`` / ``std`` are per-channel statistics applied after scaling ``uint8`` images to
    [0, 1]; ``None`` means inputs are used as they are.
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: list[str] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3


@dataclass
class DetectionSet:
    """Images with boxes, padded to ``M`` objects per image.

    ``images``: uint8 ``[N, C, H, W]``; ``boxes``: float32 ``[N, M, 4]`` ``(x1, y1, x2, y2)`` in
    pixels (pixel ``j`` covers ``[j, j + 1)``); ``labels``: int64 ``[N, M]``; ``mask``: bool
    ``[N, M]``, which rows are real objects (padding rows hold zeros).
    """

    images: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        n, m = self.labels.shape
        if len(self.images) != n or self.boxes.shape != (n, m, 4) or self.mask.shape != (n, m):
            raise ValueError(
                f"detection set: images {tuple(self.images.shape)}, boxes {tuple(self.boxes.shape)}, labels "
                f"{tuple(self.labels.shape)}, mask {tuple(self.mask.shape)} do not agree on [N, M]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def inputs(self) -> torch.Tensor:
        """Not a classification set: code written for :class:`ArrayDataset` fails here, saying why."""
        return self.targets

    @property
    def targets(self) -> torch.Tensor:
        """Not a classification set: code written for :class:`ArrayDataset` fails here, saying why."""
        from distill.errors import DistillError

        raise DistillError(
            "this is a detection data set (boxes, not one class per sample): in a recipe, set "
            "'task: detection' (see the mnist-detection preset); in Python, feed it with "
            "distill.tasks.detection.DetectionLoader"
        )

    def subset(self, index: torch.Tensor) -> "DetectionSet":
        return DetectionSet(self.images[index], self.boxes[index], self.labels[index], self.mask[index])
