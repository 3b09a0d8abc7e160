"""The recipe: typed YAML that describes a whole distillation run.

Every field has a default or is required; unknown fields are errors (a typo must not be ignored).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


Seed = Annotated[int, Field(ge=0, lt=2**63)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSpec(Strict):
    """How one model is trained (see :class:`distill.trainer.TrainConfig`)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
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
    monitor: str = "val_accuracy"
    monitor_mode: Literal["max", "min"] = "max"
    restore_best: bool = False
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints (the last is always saved)")
    tensorboard: bool = Field(True, description="also log to TensorBoard when it is installed")


class AugmentSpec(Strict):
    crop_padding: int = Field(0, ge=0, description="images: zero-pad then random crop back")
    flip: bool = Field(False, description="images: random horizontal flip")
    shift: int = Field(0, ge=0, description="1-D signals: random shift by up to this many steps")


class DataSpec(Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    seed: Seed = Field(0, description="picks the training subset, the validation split and replayed views")
    views: int | None = Field(
        None, ge=1,
        description="replay this many fixed augmented views per sample (needed to cache an augmenting teacher)",
    )
    val_fraction: float = Field(0.0, ge=0, lt=1)
    train_subset: int | None = Field(None, ge=1, description="use only this many training samples")
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    eval_batch_size: int = Field(1024, ge=1)


class ModelSpec(Strict):
    model: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None

    @field_validator("kwargs")
    @classmethod
    def _own_options(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        reserved = sorted({"name", "num_classes", "input_shape", "weights"} & set(kwargs))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} are set by distill (the data and 'weights:'), not in kwargs")
        return kwargs


class TermSpec(Strict):
    name: str | None = Field(None, pattern=r"^[^.]+$", description="defaults to the loss name")
    loss: str
    weight: float = 1.0
    student: str | list[str] = Field("logits", description="a tap name, or a list for methods that read several layers")
    teacher: str | list[str] = "logits"
    params: dict[str, Any] = Field(default_factory=dict)
    adapter: Literal["auto", "identity", "linear", "conv1x1", "conv1d"] = "auto"
    warmup_epochs: float = Field(0.0, ge=0, description="ramp the weight up linearly over this many epochs")


class MemberSpec(ModelSpec):
    """One more teacher of an ensemble: loaded (``weights``) or trained by the run (``train``)."""

    train: TrainSpec | None = None

    @model_validator(mode="after")
    def _source(self) -> "MemberSpec":
        if self.weights is None and self.train is None:
            raise ValueError("an ensemble member needs 'weights' (a file to load) or 'train'")
        return self


class EnsembleSpec(Strict):
    """The teacher plus ``members``, averaged (see :class:`distill.ensemble.TeacherEnsemble`)."""

    members: list[MemberSpec] = Field(min_length=1, description="teachers besides the main one")
    weights: list[float] | None = Field(None, description="one per teacher, the main one first; default equal")
    combine: Literal["logits", "probs"] = "logits"

    @model_validator(mode="after")
    def _weights(self) -> "EnsembleSpec":
        if self.weights is not None and len(self.weights) != len(self.members) + 1:
            raise ValueError(f"weights needs {len(self.members) + 1} values (the main teacher first)")
        return self


class AssistantSpec(ModelSpec):
    """A teacher assistant (Mirzadeh et al. 2020): distilled from the model before it in the chain."""

    train: TrainSpec | None = Field(None, description="default: the student's schedule")


class GateSpec(Strict):
    """The teacher quality gate (:mod:`distill.quality`): stop before distilling from a weak teacher."""

    enabled: bool = True
    min_accuracy: float | None = Field(None, ge=0, le=1, description="fail below this test accuracy (a fraction)")
    require_better_than_baseline: bool = Field(
        True, description="fail unless the teacher beats the student trained alone (the first seed's baseline)"
    )


class TeacherSpec(ModelSpec):
    """A teacher: trained by the run (``train``), loaded (``weights``), or used as built (``pretrained``)."""

    train: TrainSpec | None = None
    pretrained: bool = Field(
        False,
        description="the model as built is already trained (e.g. model: hf from kwargs.name_or_path): use it "
        "as-is, without weights or training",
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: str | None = None
    cache: str | None = Field(
        None,
        description="a teacher cache (from `distill cache`) to read instead of running the teacher; "
        "'auto' builds one in the run directory",
    )
    cache_topk: int | None = Field(None, ge=1, description="store only the top-k classes and the tail mass")
    cache_dtype: Literal["fp16", "fp32"] = "fp16"
    gate: GateSpec = Field(default_factory=GateSpec)
    ensemble: EnsembleSpec | None = Field(None, description="average this teacher with more")


class StageSpec(Strict):
    """A student stage: the terms it is trained with and, optionally, its own schedule."""

    enabled: bool = True
    terms: list[TermSpec]
    train: TrainSpec | None = None
    mixup_alpha: float | None = Field(
        None, gt=0,
        description="function matching (Beyer et al. 2022): train on mixup-interpolated inputs",
    )
    generations: int = Field(
        1, ge=1,
        description="born-again networks (Furlanello et al. 2018): each generation is taught by the one before",
    )
    peers: int = Field(
        1, ge=1,
        description="deep mutual learning (Zhang et al. 2018) when >= 2: students teach each other, no teacher",
    )

    @field_validator("terms")
    @classmethod
    def _named(cls, terms: list[TermSpec]) -> list[TermSpec]:
        if not terms:
            raise ValueError("at least one term is needed")
        for i, term in enumerate(terms):
            if term.name is None:
                term.name = term.loss if sum(t.loss == term.loss for t in terms) == 1 else f"{term.loss}{i}"
        return terms


class BaselineSpec(StageSpec):
    """The student trained without a teacher: cross-entropy on the labels unless told otherwise."""

    terms: list[TermSpec] = Field(default_factory=lambda: [TermSpec(name="ce", loss="ce")])


class EvaluateSpec(Strict):
    latency: bool = True
    latency_repeats: int = Field(50, ge=1)


class Recipe(Strict):
    """A whole run: data, teacher, student, the baseline and distilled stages, seeds."""

    name: str = "run"
    task: str = Field("classification", description="what the models do: classification, ranking, detection, ...")
    seeds: list[Seed] = Field(default_factory=lambda: [0])
    threads: int | None = Field(None, ge=1, description="torch.set_num_threads; default: free cores")
    data: DataSpec
    teacher: TeacherSpec
    student: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec, description="the student's schedule")
    baseline: BaselineSpec = Field(default_factory=BaselineSpec)
    distill: StageSpec
    assistants: list[AssistantSpec] = Field(
        default_factory=list,
        description="teacher-assistant chain: teacher -> assistants in order -> student, each distilled "
        "with the distill stage's terms",
    )
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the task (see its module), e.g. causal-lm's on_policy"
    )

    @model_validator(mode="after")
    def _teacher_source(self) -> "Recipe":
        if self.teacher.weights is None and self.teacher.train is None and not self.teacher.pretrained:
            raise ValueError(
                "teacher needs 'weights' (a file to load), 'train' (how to train it) or 'pretrained: true' "
                "(use the model as built)"
            )
        if self.teacher.pretrained and self.teacher.train is not None:
            raise ValueError("teacher.pretrained uses the teacher as-is: drop teacher.train (or pretrained)")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.distill.peers > 1 and (self.distill.generations > 1 or self.assistants):
            raise ValueError("distill.peers (mutual learning) does not combine with generations or assistants")
        return self
