"""What distill relies on from HF ``accelerate`` beyond its documented API, each in one function.

The trainer otherwise uses accelerate's public API only (``Accelerator``, ``prepare``,
``backward``, ``no_sync``, ``clip_grad_norm_``, ``unscale_gradients``, ``wait_for_everyone``).
``tests/test_trainer.py`` (section "accelerate compatibility") checks each behaviour relied upon
here, so an accelerate release that changes one fails there, by name, rather than as a silently
different training run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

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


def fsdp_on_cpu(accelerator, plugin) -> None:
    """Let accelerate shard with FSDP2 in a CPU process group (gloo), as it does on GPUs.

    accelerate turns FSDP on only for GPU-like process groups: with ``cpu=True`` it ignores
    ``fsdp_plugin`` and would wrap the model for DDP (``DistributedType.MULTI_CPU``). torch's FSDP2
    runs on gloo, and accelerate's FSDP2 preparation (``Accelerator._prepare_fsdp2``) needs nothing
    of a GPU; this sets the process-wide ``AcceleratorState``'s ``distributed_type`` to ``FSDP`` and
    its ``fsdp_plugin``, which is what accelerate's own set-up does for a GPU process group. Like
    that set-up, it writes the type into ``PartialState`` too (private ``_shared_state``): every
    ``AcceleratorState()`` made later (accelerate makes one per prepared optimizer) copies it from
    there. :func:`prepare_state` puts it back for an unsharded fit.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        if accelerator.mixed_precision != "no":  # FSDP2 casts through its policy, not autocast
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


_process_type = None  # the process group's DistributedType (MULTI_CPU, MULTI_GPU, ...), seen first


def prepare_state(fsdp: bool) -> None:
    """Make accelerate's process-wide state ready for an ``Accelerator`` that shards (or not).

    ``AcceleratorState`` is set up by the first ``Accelerator`` of the process and later ones reuse
    it, whatever ``fsdp_plugin`` they are given; so a fit that shards after one that did not (or the
    reverse) starts it afresh here (private ``_shared_state`` and ``_reset_state``). accelerate also
    writes ``FSDP`` into ``PartialState``'s ``distributed_type`` when it shards on GPUs, which a fresh
    ``AcceleratorState`` would copy: going back to unsharded puts the process group's own type back.
    """
    global _process_type
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    partial = PartialState._shared_state
    if _process_type is None and partial.get("distributed_type") not in (None, DistributedType.FSDP):
        _process_type = partial["distributed_type"]
    shared = AcceleratorState._shared_state
    if not shared:
        return
    was = shared.get("distributed_type") == DistributedType.FSDP
    if was != fsdp:
        AcceleratorState._reset_state(reset_partial_state=False)
        if was and _process_type is not None:
            partial["distributed_type"] = _process_type


@contextmanager
def launcher_environment():
    """Keep the ``ACCELERATE_USE_FSDP`` environment variable as the launcher set it.

    ``Accelerator(fsdp_plugin=...)`` sets it to ``true`` for the rest of the process, which would
    make every later ``Accelerator`` (an unsharded fit after a sharded one) build an FSDP plugin of
    its own from the environment.
    """
    before = os.environ.get("ACCELERATE_USE_FSDP")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("ACCELERATE_USE_FSDP", None)
        else:
            os.environ["ACCELERATE_USE_FSDP"] = before
