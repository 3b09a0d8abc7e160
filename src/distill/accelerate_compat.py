"""What distill relies on from HF ``accelerate`` beyond its documented API, each in one function.

The trainer otherwise uses accelerate's public API only (``Accelerator``, ``prepare``,
``backward``, ``no_sync``, ``clip_grad_norm_``, ``unscale_gradients``, ``wait_for_everyone``).
``tests/test_trainer.py`` (section "accelerate compatibility") checks each behaviour relied upon
here, so an accelerate release that changes one fails there, by name, rather than as a silently
different training run.
"""

from __future__ import annotations

import torch


def reset_precision_state() -> None:
    """Forget accelerate's process-wide precision settings, keeping the process group.

    ``Accelerator(...)`` refuses (``ValueError``) other mixed-precision settings than the first
    one created in the process, while one process trains stages with different precision (a bf16
    teacher, then an fp32 student). accelerate has no public way to start afresh; this is its
    private ``AcceleratorState._reset_state`` with ``reset_partial_state=False`` (the device and
    process group, ``PartialState``, stay as they are).
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def end_window(accelerator, sync: bool) -> None:
    """Tell accelerate whether this micro-step ends a gradient-accumulation window.

    The trainer keeps its own windows (they restart with each epoch, see ``Trainer``); accelerate's
    optimizer wrapper (and fp16 loss scaling, DeepSpeed's backward) steps only when
    ``accelerator.sync_gradients`` is true. This sets it through the public property setter
    instead of ``accelerator.accumulate()``, whose own step counter cannot restart with an epoch.
    """
    accelerator.sync_gradients = sync


def plain_optimizer(accelerator, optimizer) -> torch.optim.Optimizer | None:
    """The optimizer inside accelerate's wrapper, when stepping it directly is all the wrapper does.

    Without loss scaling, on a single process or with DDP, ``AcceleratedOptimizer.step`` and
    ``zero_grad`` only skip the call between accumulation steps; on the way they probe for optional
    packages and inspect signatures on every call (about 0.4 ms a step, 3% of a small MLP's step on
    a CPU core). The trainer then steps the inner optimizer (``AcceleratedOptimizer.optimizer``)
    itself, at the end of each window; any other set-up (fp16 scaling, DeepSpeed, XLA, Megatron)
    keeps the wrapper.
    """
    from accelerate.utils import DistributedType

    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.scaler is not None or accelerator.distributed_type not in plain:
        return None
    return getattr(optimizer, "optimizer", None)
