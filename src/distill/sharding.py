"""Sharded students (FSDP): which modules are sharded, their whole state, and handing them back.

With ``TrainConfig.sharding = "fsdp"`` on several processes the trainer shards the model it trains
(a :class:`distill.Distiller`: the student, its adapters, trainable loss parts) with FSDP2 through
accelerate: between uses each process holds 1/N of every parameter, gradient and optimizer state,
and a unit's weights are all-gathered just for its forward and backward. The teacher is not in that
module (see :class:`distill.Distiller`), so it is never sharded: every process runs its own copy,
inference only. This module is what distill adds around FSDP:

- :func:`shard_units` picks the modules that become FSDP units of their own, bottom-up, and
  :func:`shard` shards them and then the root, which takes whatever is left (accelerate's
  ``prepare`` then moves the optimizer over to the sharded parameters);
- :func:`model_state` / :func:`load_model_state` (and the optimizer's) give a sharded model's whole
  state gathered on rank 0 and scatter it back, for checkpoints and ``restore_best``;
- :class:`Unsharding` hands the model back after training as it came in: its own classes, plain
  parameters holding the trained values, no FSDP hooks, so that what runs after ``fit`` (saving,
  exporting, evaluating on one process, a later fit) never meets a sharded module.

FSDP2 changes modules in place (their class, their parameters, hooks and entries in their
``__dict__``) and has no public way back; :class:`Unsharding` records each module before sharding and
undoes the difference afterwards, and takes the modules out of torch's private registry of sharded
modules (``torch.distributed._composable_state``). ``tests/test_fsdp.py`` checks it (the model after a sharded fit is
plain and can be sharded again), so a torch release that changes FSDP's footprint fails there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# nn.Module attributes that hold hooks, keyed by handle id: FSDP adds forward, state-dict and
# load-state-dict hooks
_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
    "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # hold modules but are never called themselves


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a sharded (DTensor) one."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that FSDP shards as units of their own, deepest first.

    - each *part*: the nearest modules below the root that are called (``nn.ModuleList`` and
      ``nn.ModuleDict`` are looked through), e.g. a distiller's student and each of its adapters. A
      part is its own unit so that it can be called alone (validation calls the student);
    - each *block* of a layer stack inside a part: the items of an ``nn.ModuleList`` or
      ``nn.Sequential`` (a transformer's layers, a ResNet stage's blocks), so that only one block's
      weights are whole at a time.

    Modules without parameters are left out; a module that appears twice (shared) counts once.
    """
    units: list[nn.Module] = []
    seen: set[int] = set()
    for part in _parts(model):
        blocks = [
            item for _, stack in part.named_modules() if isinstance(stack, (nn.ModuleList, nn.Sequential))
            for item in stack.children() if not isinstance(item, _CONTAINERS)
        ]
        depth = {id(m): name.count(".") for name, m in part.named_modules()}
        for module in sorted(blocks, key=lambda m: -depth[id(m)]) + [part]:  # bottom-up
            if id(module) not in seen and any(True for _ in module.parameters()):
                seen.add(id(module))
                units.append(module)
    return units


def shard(model: nn.Module, *, reshard_after_forward: bool = True, mp_policy=None, offload_policy=None) -> None:
    """Shard ``model`` with FSDP2 (``torch.distributed.fsdp.fully_shard``) in place: each of
    :func:`shard_units`, then the root. The keyword arguments are ``fully_shard``'s.

    With lower-precision parameters (``mp_policy.param_dtype``, from ``train.mixed_precision``) each
    unit casts its inputs to that type, and each part gives its outputs back in fp32, so the losses
    compute in fp32 as under autocast. The root casts nothing: its inputs also feed the teacher,
    which is not sharded and keeps its own precision.
    """
    from dataclasses import replace

    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp_policy = mp_policy or MixedPrecisionPolicy()
    offload_policy = offload_policy or OffloadPolicy()
    lower = mp_policy.param_dtype not in (None, torch.float32)
    part_policy = replace(mp_policy, output_dtype=torch.float32) if lower else mp_policy
    parts = {id(m) for m in _parts(model)}
    for unit in shard_units(model):
        fully_shard(unit, reshard_after_forward=reshard_after_forward, offload_policy=offload_policy,
                    mp_policy=part_policy if id(unit) in parts else mp_policy)
    fully_shard(model, mp_policy=replace(mp_policy, cast_forward_inputs=False), offload_policy=offload_policy)


def _parts(model: nn.Module) -> list[nn.Module]:
    """The nearest modules with parameters below ``model``, looking through containers."""
    parts: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, _CONTAINERS):
            parts.extend(_parts(child))
        elif any(True for _ in child.parameters()):
            parts.append(child)
    return parts


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (all-gathered: every process must call this), or the tensor itself."""
    if not hasattr(tensor, "full_tensor"):
        return tensor
    device = tensor.device_mesh.device_type
    if tensor.device.type != device:  # shards offloaded to the CPU are gathered through the mesh's device
        tensor = tensor.to(device)
    return tensor.full_tensor()


def whole(value: Any) -> Any:
    """``value`` with a DTensor (e.g. a gradient norm of a sharded model) made whole."""
    return _full(value) if isinstance(value, torch.Tensor) else value


def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all gradients of a sharded model's ``params`` (collective; a 0-d tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(float("nan"))
    return _full(torch.nn.utils.get_total_norm(grads)).detach()


# ------------------------------------------------------------------------------ whole states
def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict: for a sharded model gathered on the CPU of rank 0 (the other
    processes get ``{}``; every process must call this), else its own ``state_dict()``."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict; into a sharded model from rank 0's ``state`` (the others may pass
    ``{}``; every process must call this)."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(broadcast_from_rank0=True))


def optimizer_state(model: nn.Module, optimizer) -> dict[str, Any]:
    """The optimizer's whole state: for a sharded model keyed by parameter name and gathered on rank
    0 (every process must call this), else its own ``state_dict()`` (keyed by position)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    return get_optimizer_state_dict(model, inner, options=_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`optimizer_state` gave, sharded or not, into a sharded model's optimizer (from
    rank 0; every process must call this) or a plain one: a checkpoint resumes on any number of
    processes."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]  # the optimizer's order
    if not is_sharded(model):
        optimizer.load_state_dict(_keyed(state, {name: i for i, name in enumerate(names)}))
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    inner = getattr(optimizer, "optimizer", optimizer)
    set_optimizer_state_dict(model, inner, _keyed(state, dict(enumerate(names))),
                             options=_options(broadcast_from_rank0=True))


def _keyed(state: dict[str, Any], key: dict) -> dict[str, Any]:
    """An optimizer state dict keyed by position (torch's) or by parameter name (a sharded model's),
    re-keyed through ``key`` (position -> name, or name -> position) where it has the other kind."""
    groups = state.get("param_groups", [])
    if not any(p in key for group in groups for p in group["params"]):
        return state  # already keyed as wanted (or empty)
    return {
        "state": {key[k]: v for k, v in state.get("state", {}).items()},
        "param_groups": [{**group, "params": [key[p] for p in group["params"]]} for group in groups],
    }


# ------------------------------------------------------------------------------ handing back
class Unsharding:
    """What ``model`` was before sharding, to make it so again with the trained weights.

    Made before the model is sharded; :meth:`restore` (every process must call it) gathers each
    sharded parameter whole, puts it back as a plain ``nn.Parameter`` on the device the model came
    on, and removes what sharding added to each module: its FSDP class, hooks and attributes (a
    hook or attribute that anything else added to a module during the fit goes too).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.modules = [
            (module, module.__class__, set(vars(module)),
             {name: set(getattr(module, name, {})) for name in _HOOK_DICTS},
             {name: (p is not None and p.requires_grad) for name, p in module._parameters.items()})
            for module in model.modules()
        ]

    def restore(self) -> nn.Module:
        from torch.distributed import _composable_state
        from torch.distributed.fsdp import FSDPModule

        for module, *_ in self.modules:
            if isinstance(module, FSDPModule):
                module.reshard()  # every parameter registered sharded (the root may hold whole ones)
        plain: dict[int, nn.Parameter] = {}  # shared parameters stay shared
        for module, cls, attributes, hooks, params in self.modules:
            for name, requires_grad in params.items():
                param = module._parameters.get(name)
                if param is None:
                    continue
                if id(param) not in plain:
                    value = _full(param.detach()).to(self.device)
                    plain[id(param)] = nn.Parameter(value, requires_grad=requires_grad)
                module._parameters[name] = plain[id(param)]
            for name, before in hooks.items():
                table = getattr(module, name, None)
                for key in [k for k in (table or {}) if k not in before]:
                    del table[key]
            for key in [k for k in vars(module) if k not in attributes]:
                del vars(module)[key]  # e.g. FSDP's state registry, accelerate's forward wrapper
            module.__class__ = cls
            _composable_state._module_state_mapping.pop(module, None)  # else fully_shard refuses it next time
        for buffer_owner, *_ in self.modules:
            for name, buffer in buffer_owner._buffers.items():
                if buffer is not None and buffer.device != self.device:
                    buffer_owner._buffers[name] = buffer.to(self.device)
        return self.model
