"""The recipe: typed YAML that describes a whole distillation run.

Every field has a default or is required; unknown fields are errors (a typo must not be ignored).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distill.train_config import TrainConfig


Seed = Annotated[int, Field(ge=0, lt=2**63)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainSpec(TrainConfig):
    """A recipe's ``train:`` section: a :class:`distill.TrainConfig` (one type for recipes and the
    API). ``seed`` and ``progress`` are set by the run (``seeds:``, ``--quiet``), not here."""

    seed: int = Field(0, ge=0, exclude=True)
    progress: bool = Field(True, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _run_owned(cls, data: Any) -> Any:
        if isinstance(data, dict):
            owned = {"seed": "seeds: [...] at the top of the recipe (or --seeds)", "progress": "--quiet"}
            given = [k for k in owned if k in data]
            if given:
                raise ValueError("; ".join(f"train.{k} is set by the run: use {owned[k]}" for k in given))
        return data


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
    labelled: int | None = Field(
        None, ge=1,
        description="keep the labels of only this many training samples (validation is carved from them); "
        "the rest is an unlabelled transfer set that only the teacher terms read",
    )
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
    finetune: bool = Field(False, description="train the loaded 'weights' further with 'train'")

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
    """A teacher: trained by the run (``train``), loaded (``weights``), or used as built (``pretrained``).

    Given ``weights``, the teacher is loaded and not trained, even when ``train`` is also set (a
    preset's schedule, say): fine-tuning loaded weights is asked for with ``finetune: true``."""

    train: TrainSpec | None = None
    finetune: bool = Field(False, description="train the loaded 'weights' further with 'train'")
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


class PilotSpec(Strict):
    """The pilot (:mod:`distill.pilot`): choose temperature and term weights on a validation split
    carved from the training data, within a share of the run's training budget."""

    enabled: bool = True
    budget: float = Field(0.25, gt=0, le=1, description="share of the run's student training epochs the pilot spends")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="validation split carved from training (when data.val_fraction is 0)")
    min_val_samples: int = Field(200, ge=1, description="refuse a validation split smaller than this")
    temperatures: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0], min_length=1,
        description="tried for every term whose loss takes a temperature")
    teacher_weights: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.5, 0.9], min_length=1,
        description="the teacher terms' share of the total weight (the label terms keep the rest)")


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
    pilot: PilotSpec | None = Field(None, description="choose the distill stage's settings on validation data first")
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
        if self.teacher.finetune and (self.teacher.weights is None or self.teacher.train is None):
            raise ValueError("teacher.finetune trains loaded weights further: it needs teacher.weights and teacher.train")
        if self.teacher.pretrained and self.teacher.train is not None:
            raise ValueError("teacher.pretrained uses the teacher as-is: drop teacher.train (or pretrained)")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.distill.peers > 1 and (self.distill.generations > 1 or self.assistants):
            raise ValueError("distill.peers (mutual learning) does not combine with generations or assistants")
        return self
