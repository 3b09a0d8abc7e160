"""Hugging Face models as teachers and students, with taps on hidden states and attentions by layer.

    model, tokenizer = load_pretrained("path/or/hub-name", num_labels=2)     # HFModel, its tokenizer
    student = from_config({"model_type": "bert", "hidden_size": 192, "num_hidden_layers": 2,
                           "num_attention_heads": 12, "intermediate_size": 768}, num_labels=2)
    save_pretrained(student, "out/student-hf", tokenizer)    # AutoModelFor...from_pretrained loads it

:class:`HFModel` wraps a ``transformers`` model so that its per-layer outputs are tap points, ordinary
submodules that :class:`distill.taps.Taps` hooks by name like any other:

- ``hidden_states.<i>``: ``[B, T, D]``, HF's ``outputs.hidden_states[i]``: ``0`` is the embedding
  output, ``i`` (1..L) the output of transformer layer ``i``;
- ``attentions.<i>``: ``[B, H, T, T]``, HF's ``outputs.attentions[i]``: the attention probabilities
  (after softmax, before dropout) of layer ``i + 1``, i.e. of the layer that produces
  ``hidden_states.<i+1>``;
- ``logits``: the model's ``outputs.logits`` (sequence classification: ``[B, num_labels]``).

The wrapper asks the model for ``output_hidden_states`` / ``output_attentions`` only when one of
those taps is hooked, and switches the model to eager attention the first time an attention tap is
(SDPA and flash attention do not return the probabilities). Plain module paths tap too, under
``model.``: ``model.bert.encoder.layer.3`` is the same tensor as ``hidden_states.4``,
``model.bert.pooler`` the pooled ``[CLS]`` feature.

``transformers`` is imported inside the functions that need it; without it they raise a
:class:`DistillError` naming ``pip install distill[nlp]``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from torch import nn

from distill.errors import DistillError

INSTALL_HINT = "pip install distill[nlp]"

# The tasks load_pretrained / from_config build, by the Auto class that builds them.
TASKS = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "causal-lm": "AutoModelForCausalLM",
    "base": "AutoModel",
}


def require_transformers():
    """The ``transformers`` module, or a :class:`DistillError` naming the extra to install."""
    try:
        import transformers
    except ImportError:
        raise DistillError(
            f"Hugging Face models need the transformers and tokenizers packages: {INSTALL_HINT}"
        ) from None
    return transformers


def _auto_class(task: str):
    if task not in TASKS:
        raise DistillError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    return getattr(require_transformers(), TASKS[task])


class HFModel(nn.Module):
    """A Hugging Face model whose hidden states and attentions are tap points (see the module doc).

    ``forward(input_ids, **inputs)`` passes on the inputs the wrapped model's ``forward`` names
    (``attention_mask``, ``token_type_ids``, ...; others, such as ``labels``, are dropped) and
    returns the model's output object; :func:`distill.taps.output_tensor` reads its ``logits``.
    ``model`` is the wrapped ``PreTrainedModel``: save the trained student with
    :func:`save_pretrained` (``wrapper.model.save_pretrained(path)`` plus the tokenizer, atomically).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(layers, int):
            raise DistillError(
                f"{type(model).__name__} has no config.num_hidden_layers; HFModel wraps transformers models"
            )
        self.model = model
        self.hidden_states = nn.ModuleList(nn.Identity() for _ in range(layers + 1))
        self.attentions = nn.ModuleList(nn.Identity() for _ in range(layers))
        self.feature_taps = [f"hidden_states.{i}" for i in range(1, layers + 1)]
        params = inspect.signature(model.forward).parameters.values()
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        accepted = {p.name for p in params if p.kind in named}
        self._accepted = accepted if "input_ids" in accepted else None  # None: pass everything on

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.attentions)

    def _use_eager_attention(self) -> None:
        if getattr(self.model.config, "_attn_implementation", "eager") == "eager":
            return
        setter = getattr(self.model, "set_attn_implementation", None)
        if setter is None:  # older transformers: SDPA falls back to eager when asked for attentions
            return
        try:
            setter("eager")
        except (ValueError, ImportError) as exc:
            raise DistillError(
                f"attention taps need eager attention, and this model cannot switch to it ({exc}); load it "
                "with attn_implementation='eager'"
            ) from None

    def forward(self, input_ids: Any = None, **inputs: Any):
        if input_ids is not None:
            inputs["input_ids"] = input_ids
        if self._accepted is not None:
            inputs = {k: v for k, v in inputs.items() if k in self._accepted}
        want_hidden = any(point._forward_hooks for point in self.hidden_states)
        want_attention = any(point._forward_hooks for point in self.attentions)
        if want_attention:
            self._use_eager_attention()
        if want_hidden:
            inputs["output_hidden_states"] = True
        if want_attention:
            inputs["output_attentions"] = True
        out = self.model(**inputs, return_dict=True)
        if want_hidden:
            for point, value in zip(self.hidden_states, out.hidden_states):
                point(value)
        if want_attention:
            attentions = getattr(out, "attentions", None)
            if not attentions or attentions[0] is None:
                raise DistillError(
                    f"{type(self.model).__name__} returned no attention probabilities; load it with "
                    "attn_implementation='eager'"
                )
            for point, value in zip(self.attentions, attentions):
                point(value)
        return out


def _source(name_or_path: str | os.PathLike[str]) -> str:
    """A local folder (``~`` expanded) or a hub name; a path that names no folder is an error."""
    text = os.fspath(name_or_path)
    local = os.path.expanduser(text)
    if os.path.isdir(local):
        return local
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise DistillError(f"model folder '{text}' does not exist")
    return text


def load_pretrained(
    name_or_path: str | os.PathLike[str],
    *,
    task: str = "sequence-classification",
    num_labels: int | None = None,
    attentions: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tuple[HFModel, Any]:
    """A pretrained model (wrapped in :class:`HFModel`) and its own tokenizer.

    ``name_or_path`` is a local folder (``config.json`` and weights) or a hub name; with
    ``HF_HUB_OFFLINE=1`` hub names load from the local cache only. ``task`` picks the head:
    ``sequence-classification`` (``num_labels`` sets its size; a fresh head is initialised when the
    checkpoint has none), ``causal-lm`` (next-token logits ``[B, T, V]``) or ``base`` (no head:
    ``logits`` is then the last hidden state).
    ``attentions=True`` loads with eager attention, so attention taps cost no switch later.
    ``tokenizer`` loads the tokenizer from elsewhere (default: the same place). Other keyword
    arguments go to ``from_pretrained``.
    """
    auto = _auto_class(task)
    transformers = require_transformers()
    source = _source(name_or_path)
    if num_labels is not None:
        if task != "sequence-classification":
            raise DistillError("num_labels applies to task='sequence-classification' only")
        kwargs["num_labels"] = int(num_labels)
    if attentions:
        kwargs.setdefault("attn_implementation", "eager")
    # transformers reports every head it initialises afresh ("MISSING classifier ..."): for a
    # classifier built on an encoder that is expected (the head is trained with the student)
    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on a run's log, per model
    try:
        model = auto.from_pretrained(source, **kwargs)
        tok = transformers.AutoTokenizer.from_pretrained(
            _source(tokenizer) if tokenizer is not None else source
        )
    except (OSError, ValueError) as exc:
        offline = " (HF_HUB_OFFLINE is set: only local folders and cached models load)" if os.environ.get(
            "HF_HUB_OFFLINE", "") not in ("", "0") else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistillError(f"cannot load '{name_or_path}'{offline}: {first}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return HFModel(model), tok


def from_config(
    config: Any, *, task: str = "sequence-classification", num_labels: int | None = None, seed: int | None = None
) -> HFModel:
    """A randomly initialised model (wrapped in :class:`HFModel`) from a ``transformers`` config.

    ``config`` is a ``PretrainedConfig`` or a dict with a ``model_type`` (``{"model_type": "bert",
    "hidden_size": 192, ...}``). ``seed`` makes the initial weights reproducible.
    """
    transformers = require_transformers()
    auto = _auto_class(task)
    if isinstance(config, dict):
        options = dict(config)
        model_type = options.pop("model_type", None)
        if not model_type:
            raise DistillError("a config dict needs a 'model_type', e.g. {'model_type': 'bert', ...}")
        try:
            config = transformers.AutoConfig.for_model(model_type, **options)
        except ValueError as exc:
            raise DistillError(f"cannot build a '{model_type}' config: {exc}") from None
    if num_labels is not None:
        config.num_labels = int(num_labels)
    if seed is not None:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return HFModel(auto.from_config(config))
    return HFModel(auto.from_config(config))


def save_pretrained(model: nn.Module, folder: str | os.PathLike[str], tokenizer: Any = None) -> Path:
    """Write ``model`` (an :class:`HFModel`, or a bare ``transformers`` model) as a Hugging Face
    folder, with ``tokenizer`` (a ``transformers`` tokenizer) when given, so that the Auto classes
    load it back: ``AutoModelForSequenceClassification.from_pretrained(folder)`` (or
    ``AutoModelForCausalLM``, ``AutoModel``: the class of the head it has) and
    ``AutoTokenizer.from_pretrained(folder)``. The folder is built aside and moved into place
    (:func:`distill.checkpoints.atomic_directory`); returns its path."""
    from distill.checkpoints import atomic_directory

    inner = model.model if isinstance(model, HFModel) else model
    if not hasattr(inner, "save_pretrained"):
        raise DistillError(f"{type(model).__name__} is no Hugging Face model; save its weights with "
                           "distill.models.save_weights instead")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise DistillError(f"{type(tokenizer).__name__} is no transformers tokenizer; pass tokenizer=None")
    transformers = require_transformers()

    def write(tmp: Path) -> None:
        verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # "Writing model shards" bars on a run's log
        try:
            inner.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        finally:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()

    return atomic_directory(Path(os.path.expanduser(os.fspath(folder))), write)
