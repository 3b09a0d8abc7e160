"""``DistillTrainer``: a ``transformers.Trainer`` whose loss is a distill objective.

    trainer = DistillTrainer(
        model=student, teacher=teacher,
        terms=[Term("hard", "ce", weight=0.5), Term("soft", "kd", weight=0.5, params={"temperature": 2.0}),
               Term("hidden2", "hint", student="hidden_states.2", teacher="hidden_states.6")],
        args=TrainingArguments(output_dir="out", remove_unused_columns=False, ...),
        train_dataset=..., data_collator=...,
    )
    trainer.train()          # logs loss and every term (hard, soft, hidden2) at each logging step
    trainer.save_model()     # the student alone, as a Hugging Face model

For training that lives in Hugging Face: everything the Trainer does (devices, precision,
accumulation, schedules, callbacks, checkpoints) stays, and ``compute_loss`` returns the
:class:`distill.Distiller`'s weighted total. Batches are the Trainer's dicts; ``labels`` is what
label terms (``ce``) read. With one tokenizer the batch's ``input_ids`` etc. feed both models; with
two, each side reads its own ``student.input_ids`` / ``teacher.input_ids`` etc.:
``data_collator=TextCollator({"student": student_tok, "teacher": teacher_tok})`` tokenises raw-text
examples that way (with a ``datasets.Dataset`` set ``remove_unused_columns=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import transformers
from torch import nn

from distill.errors import DistillError
from distill.nlp.feed import TextFeed
from distill.nlp.hf import HFModel
from distill.objective import Distiller, Term
from distill.signals import LiveTeacher, TeacherSignal


def _tappable(model: nn.Module) -> nn.Module:
    """Hugging Face models get hidden-state and attention tap points; other modules stay as they are."""
    if isinstance(model, HFModel):
        return model
    if isinstance(model, transformers.PreTrainedModel):
        return HFModel(model)
    return model


class DistillTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains ``model`` (the student) with distill ``terms``
    against ``teacher``.

    ``model`` and ``teacher`` are Hugging Face models (raw, or wrapped in
    :class:`distill.nlp.hf.HFModel`), any ``nn.Module`` fed by ``student_feed`` /
    ``teacher_feed``, or for the teacher any :class:`distill.signals.TeacherSignal`. Tap names are
    those of :class:`HFModel` (``hidden_states.<i>``, ``attentions.<i>``, ``logits``). Feeds default
    to :class:`TextFeed` for the ``"student"`` and ``"teacher"`` sides. Adapters and trainable loss
    parts are created from the first training batch (a :meth:`Distiller.dry_run`, which must find no
    problem) and optimised with the student, in a parameter group without weight decay (the
    ``Trainer``'s gradient clipping covers the student only). ``trainer.distiller`` is the objective;
    ``save_model`` saves the student alone. One process only (no DDP yet). Other arguments are the
    ``Trainer``'s.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | TeacherSignal,
        terms: Sequence[Term],
        *args: Any,
        student_feed=None,
        teacher_feed=None,
        teacher_precision: str = "fp32",
        **kwargs: Any,
    ) -> None:
        if isinstance(model, HFModel):  # the Trainer saves what it trains: the bare HF model
            model = model.model
        super().__init__(model, *args, **kwargs)
        if self.args.world_size > 1:
            # the objective calls the bare student, not the DDP-wrapped one: gradients would not be synced
            raise DistillError(
                "DistillTrainer runs in one process for now; for several GPUs use distill's Trainer "
                "(accelerate launch), which distributes the whole objective"
            )
        # the objective is a per-batch mean: the Trainer divides it over accumulation steps itself
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        if isinstance(teacher, nn.Module):
            teacher = LiveTeacher(_tappable(teacher), precision=teacher_precision,
                                  feed=teacher_feed or TextFeed("teacher"))
        self.distiller = Distiller(_tappable(model), teacher, terms, feed=student_feed or TextFeed("student"))
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_count = 0
        self._dry_run_done = False

    # -- the objective's own parameters ---------------------------------------------------------
    def _prepare_objective(self, batch: dict[str, Any] | None = None) -> None:
        if self._dry_run_done:
            return
        if batch is None:
            batch = self._prepare_inputs(next(iter(self.get_train_dataloader())))
        report = self.distiller.dry_run(self._distill_batch(batch))
        if report.problems:
            raise DistillError("the distillation objective failed its dry run: " + "; ".join(report.problems))
        self._dry_run_done = True

    def _objective_parameters(self) -> list[nn.Parameter]:
        student = {id(p) for p in self.model.parameters()}
        return [p for p in self.distiller.parameters() if id(p) not in student and p.requires_grad]

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        had_optimizer = self.optimizer is not None
        self._prepare_objective()
        optimizer = super().create_optimizer(model)
        extra = self._objective_parameters()
        if extra and not had_optimizer:
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
        return optimizer

    # -- the loss ---------------------------------------------------------------------------------
    @staticmethod
    def _distill_batch(inputs: dict[str, Any]) -> dict[str, Any]:
        batch = dict(inputs)
        if "target" not in batch and "labels" in batch:
            batch["target"] = batch["labels"]
        return batch

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if not self._dry_run_done:  # optimizers=(...) given: create_optimizer was not called
            self._prepare_objective(inputs)
            optimized = {id(p) for group in getattr(self.optimizer, "param_groups", []) for p in group["params"]}
            if any(id(p) not in optimized for p in self._objective_parameters()):
                raise DistillError(
                    "the objective has trainable adapters or loss parts that the optimizer you passed does not "
                    "hold; let DistillTrainer create the optimizer, or build yours from "
                    "trainer.distiller.parameters() after trainer.distiller.dry_run(batch)"
                )
        self.distiller.train(model.training)
        out = self.distiller(self._distill_batch(inputs))
        if model.training:
            for name, value in out.terms.items():
                self._term_sums[name] = self._term_sums.get(name, 0.0) + value.detach().float()
            self._term_count += 1
        if return_outputs:
            return out.loss, {"logits": out.student["logits"]}
        return out.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds each term's mean since the last log (unweighted, under its name) to training logs."""
        if "loss" in logs and self._term_count:
            for name, total in self._term_sums.items():
                logs[name] = round(float(total) / self._term_count, 6)
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)
