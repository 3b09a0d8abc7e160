"""Measure a model as deployed: parameters, size, CPU latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers as stored (fp32 weights: 4 bytes each)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def cpu_latency_ms(
    model: nn.Module, example: torch.Tensor, repeats: int = 50, warmup: int = 5
) -> float:
    """Median milliseconds of one forward pass on ``example`` (batch of 1 for per-sample latency),
    on CPU with the current ``torch.get_num_threads()``."""
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model_cpu = model.to("cpu")
    example = example.to("cpu")
    for _ in range(warmup):
        model_cpu(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model_cpu(example)
        times.append(time.perf_counter() - start)
    model.to(device)
    model.train(was_training)
    return statistics.median(times) * 1000.0
