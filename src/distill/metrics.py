"""Classification metrics: what compares a student with the labels and with its teacher.

Metric functions are pure: ``[N, C]`` logits and ``[N]`` integer targets in, a float out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.signals import default_feed, move_batch
from distill.taps import output_tensor


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((logits.argmax(-1) == targets).float().mean())


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 5) -> float:
    """Fraction of samples whose target is among the ``k`` highest logits."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return float((top == targets[:, None]).any(-1).float().mean())


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Fraction of samples where student and teacher predict the same class."""
    return float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """KL(teacher ‖ student) at temperature 1, in nats, mean over samples."""
    log_s = F.log_softmax(student_logits.float(), -1)
    log_t = F.log_softmax(teacher_logits.float(), -1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, bins: int = 15) -> float:
    """ECE (Guo et al. 2017): confidence-accuracy gap averaged over equal-width confidence bins,
    weighted by the fraction of samples in each bin."""
    probs = F.softmax(logits.float(), -1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.float().mean() * (confidence[inside].mean() - correct[inside].mean()).abs()
    return float(ece)


def per_class_accuracy(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy of each class (NaN for a class absent from ``targets``)."""
    predicted = logits.argmax(-1)
    out = []
    for c in range(num_classes):
        mask = targets == c
        out.append(float((predicted[mask] == c).float().mean()) if mask.any() else float("nan"))
    return out


@torch.no_grad()
def predict(
    model: nn.Module, loader, device: torch.device | str | None = None, *, feed=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` and targets ``[N]`` of ``model`` over ``loader``, in eval mode, on CPU;
    ``feed`` (default: ``model(batch["input"])``) gives a batch to the model."""
    give = feed if feed is not None else default_feed
    was_training = model.training
    model.eval()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    logits, targets = [], []
    for batch in loader:
        batch = move_batch(batch, device)
        logits.append(output_tensor(give(model, batch)).float().cpu())
        targets.append(batch["target"].cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """accuracy, top5 (more than 5 classes), ece, and agreement / kl_to_teacher given a teacher."""
    metrics = {"accuracy": accuracy(logits, targets), "ece": expected_calibration_error(logits, targets)}
    if logits.shape[-1] > 5:
        metrics["top5"] = topk_accuracy(logits, targets, 5)
    if teacher_logits is not None:
        metrics["agreement"] = agreement(logits, teacher_logits)
        metrics["kl_to_teacher"] = kl_teacher_student(logits, teacher_logits)
    return metrics
