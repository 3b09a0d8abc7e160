"""How a model is trained: one type for the Python API (``Trainer(..., TrainConfig(...))``) and for
recipes (every ``train:`` section of a YAML recipe is a :class:`TrainConfig`).

Unknown fields are errors, as everywhere in a recipe. ``seed`` and ``progress`` are set by
``distill run`` for each of the recipe's ``seeds`` and from ``--quiet``; a recipe does not give them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """A training schedule: optimizer, learning rate and its schedule, precision, sharding,
    checkpoints, early stopping."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1, description="samples per step (the loader's; the trainer reads its loader)")
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine", "step", "linear"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    clip_grad_norm: float | None = Field(None, gt=0)
    early_stopping_patience: int | None = Field(None, ge=1)
    monitor: str | None = Field(
        None,
        description="the validation metric early stopping and restore_best follow; default: "
        "val_<the task's primary metric> in a run, val_accuracy for a bare Trainer",
    )
    monitor_mode: Literal["max", "min"] = "max"
    restore_best: bool = Field(False, description="end with the weights of the best validation epoch")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints (the last is always saved)")
    tensorboard: bool = Field(True, description="also log to TensorBoard when it is installed")
    cpu: bool = Field(False, description="train on the CPU even when an accelerator is present")
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="fsdp: shard the student's parameters, gradients and optimizer state across the launched "
        "processes (FSDP2, through accelerate); the teacher is not sharded. One process trains unsharded",
    )
    channels_last: bool = Field(
        False,
        description="train image models in the channels-last memory format (4-D batches and conv weights "
        "NHWC): the same model, often faster convolutions (benchmarks/channels_last.py: 1.26-1.48x an epoch "
        "of the CIFAR-10 CNNs on this project's CPU, none for a width-4 one). The student's 4-D weights are in "
        "that format during the fit and contiguous after it (a teacher the trainer does not own keeps its own); "
        "not with sharding: fsdp",
    )
    seed: int = Field(0, ge=0, description="set by distill run for each of the recipe's seeds")
    progress: bool = Field(True, description="set by distill run (--quiet turns it off)")

    @model_validator(mode="after")
    def _formats(self) -> "TrainConfig":
        if self.channels_last and self.sharding == "fsdp":
            raise ValueError("channels_last is not available with sharding: fsdp (FSDP shards the weights as they are)")
        return self

    def monitored(self, default: str = "val_accuracy") -> str:
        """The metric early stopping follows: ``monitor``, else ``default``."""
        return self.monitor or default
