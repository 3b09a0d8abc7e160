"""Text classification: how a batch of token ids is fed to each model, and its predictions.

Teacher and student may use different tokenizers. A batch then carries each side's own
tokenisation under a prefix (``student.input_ids``, ``teacher.input_ids``, ...; see
:class:`distill.nlp.data.TextLoader`), and each side gets a :class:`TextFeed` that picks its own:

    distiller = Distiller(student, teacher, terms, feed=TextFeed("student"), teacher_feed=TextFeed("teacher"))

(or ``LiveTeacher(teacher, feed=TextFeed("teacher"))`` as the teacher). Give the teacher its own feed:
with only ``feed``, it would read the student's ids, which fails loudly only when they exceed its
vocabulary.

When both sides share one tokenizer the batch holds plain ``input_ids`` / ``attention_mask`` /
``token_type_ids`` (what a Hugging Face data collator gives) and every :class:`TextFeed` reads those.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.errors import DistillError
from distill.signals import Batch

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class TextFeed:
    """Feed ``model(**inputs)`` with one side's token inputs from a batch dict.

    ``side`` (``"student"``, ``"teacher"``, or any name) selects the keys ``"<side>.<name>"``; when
    the batch has none of those (one shared tokenisation), or ``side`` is ``None``, the plain keys
    in :data:`INPUT_NAMES` are used. Labels and other keys are never passed to the model.
    """

    def __init__(self, side: str | None = None) -> None:
        self.side = side

    def inputs(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.side is not None:
            prefix = f"{self.side}."
            own = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
            if own:
                return own
        found = {k: batch[k] for k in INPUT_NAMES if k in batch}
        if "input_ids" not in found:
            side = f"'{self.side}.input_ids' or " if self.side else ""
            raise DistillError(
                f"the batch has no token ids for {self.side or 'the model'}: expected {side}'input_ids'; "
                f"it has {', '.join(sorted(map(str, batch))) or 'no keys'}"
            )
        return found

    def __call__(self, model: nn.Module, batch: Batch) -> Any:
        return model(**self.inputs(batch))

    def __repr__(self) -> str:
        return f"TextFeed({self.side!r})"


@torch.no_grad()
def predict(
    model: nn.Module, loader, feed: TextFeed | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` and targets ``[N]`` of ``model`` over ``loader``, in eval mode, on CPU."""
    from distill.metrics import predict as predict_classes

    return predict_classes(model, loader, device, feed=feed or TextFeed())
