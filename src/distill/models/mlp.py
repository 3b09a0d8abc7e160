"""Multilayer perceptrons, including the MNIST nets of Hinton, Vinyals & Dean (2015).

The paper's teacher is 784-1200-1200-10 with dropout (0.2 on the input, 0.5 on hidden units);
its student is 784-800-800-10 without dropout. ``hinton-tiny`` (30-30) is the much smaller
student that makes the capacity gap visible.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from distill.errors import DistillError
from distill.models.registry import MODELS


def _check_dropout(p: object, name: str, model: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise DistillError(f"model '{model}': {name} must be a number in [0, 1), got {p!r}")
    return float(p)


def build_mlp(
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: Sequence[int],
    dropout: float,
    input_dropout: float,
    model: str = "mlp",
) -> nn.Sequential:
    """``flatten → [drop_in] → (fc_i → act_i → [drop_i])* → fc``.

    ``[B, *input_shape]`` → ``[B, num_classes]``.

    Hidden layers are ``fc1``, ``act1``, ``fc2``, ... and the logit layer is ``fc``; the returned
    module's ``feature_taps`` lists the activations ``act1, act2, ...`` (taken before dropout).
    """
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise DistillError(
            f"model '{model}': hidden must be a list of layer widths, got {hidden!r}"
        )
    for width in hidden:
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise DistillError(
                f"model '{model}': hidden widths must be positive integers, got {list(hidden)}"
            )
    dropout = _check_dropout(dropout, "dropout", model)
    input_dropout = _check_dropout(input_dropout, "input_dropout", model)
    if not input_shape or any(int(d) < 1 for d in input_shape):
        raise DistillError(
            f"model '{model}': input_shape must be positive sizes, got {input_shape}"
        )

    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten(1))
    if input_dropout > 0:
        layers["drop_in"] = nn.Dropout(input_dropout)
    features = math.prod(int(d) for d in input_shape)
    for i, width in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(features, width)
        layers[f"act{i}"] = nn.ReLU()
        if dropout > 0:
            layers[f"drop{i}"] = nn.Dropout(dropout)
        features = width
    layers["fc"] = nn.Linear(features, num_classes)
    net = nn.Sequential(layers)
    # With no hidden layer the only feature is the flattened input.
    net.feature_taps = [f"act{i}" for i in range(1, len(hidden) + 1)] or ["flatten"]
    return net


@MODELS.register("mlp")
def mlp(
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: Sequence[int] = (256, 256),
    dropout: float = 0.0,
    input_dropout: float = 0.0,
) -> nn.Module:
    """A ReLU MLP on the flattened input; ``hidden`` lists the layer widths."""
    return build_mlp(num_classes, input_shape, hidden, dropout, input_dropout, "mlp")


@MODELS.register("hinton-teacher")
def hinton_teacher(
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: Sequence[int] = (1200, 1200),
    dropout: float = 0.5,
    input_dropout: float = 0.2,
) -> nn.Module:
    """Hinton et al.'s MNIST teacher: 1200-1200 ReLU, dropout 0.5 (0.2 on the input)."""
    return build_mlp(num_classes, input_shape, hidden, dropout, input_dropout, "hinton-teacher")


@MODELS.register("hinton-student")
def hinton_student(
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: Sequence[int] = (800, 800),
    dropout: float = 0.0,
    input_dropout: float = 0.0,
) -> nn.Module:
    """Hinton et al.'s MNIST student: 800-800 ReLU, no dropout."""
    return build_mlp(num_classes, input_shape, hidden, dropout, input_dropout, "hinton-student")


@MODELS.register("hinton-tiny")
def hinton_tiny(
    num_classes: int,
    input_shape: tuple[int, ...],
    hidden: Sequence[int] = (30, 30),
    dropout: float = 0.0,
    input_dropout: float = 0.0,
) -> nn.Module:
    """A very small student: 30-30 ReLU, no dropout."""
    return build_mlp(num_classes, input_shape, hidden, dropout, input_dropout, "hinton-tiny")
