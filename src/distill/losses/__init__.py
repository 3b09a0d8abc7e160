"""Distillation losses: pure functions of tensors, registered by name.

A new method is one file here plus its ``@register_loss`` line.
"""

from distill.losses import ce, hint, kd  # noqa: F401  (registration)
from distill.losses.ce import ce_loss
from distill.losses.hint import hint_loss
from distill.losses.kd import kd_loss
from distill.losses.registry import LOSSES, LossSpec, get_loss, register_loss

__all__ = ["LOSSES", "LossSpec", "get_loss", "register_loss", "kd_loss", "ce_loss", "hint_loss"]
