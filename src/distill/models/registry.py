"""Models by name.

A model factory is ``fn(num_classes: int, input_shape: tuple[int, ...], **kwargs) -> nn.Module``;
the module maps a batch ``[B, *input_shape]`` to logits ``[B, num_classes]``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from distill.registry import Registry

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")
