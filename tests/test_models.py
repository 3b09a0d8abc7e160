"""The model zoo: every model builds and classifies, sizes match the CRD benchmark, taps resolve,
custom models import by path, and weight files round-trip without ever unpickling code."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.errors import DistillError
from distill.models import (
    MODELS,
    count_params,
    create_model,
    load_weights,
    model_names,
    save_weights,
)

pytestmark = pytest.mark.fast

torch.set_num_threads(1)

SEQUENCE_MODELS = {"cnn1d"}
FLAT_MODELS = {"mlp", "hinton-teacher", "hinton-student", "hinton-tiny"}
LANGUAGE_MODELS = {"gpt"}  # token ids [B, T] -> [B, T, V]: tests/test_lm.py
CLASSIFIERS = [n for n in model_names() if n not in LANGUAGE_MODELS]
IMAGE_MODELS = [n for n in CLASSIFIERS if n not in SEQUENCE_MODELS | FLAT_MODELS]


def _shapes(name: str) -> list[tuple[int, ...]]:
    if name in SEQUENCE_MODELS:
        return [(40,), (1, 40)]
    if name in FLAT_MODELS:
        return [(3, 32, 32), (1, 28, 28), (40,)]
    return [(3, 32, 32), (1, 28, 28)]


def _classifier(model: nn.Module) -> nn.Linear:
    """The logit layer: the last linear layer registered (true for every zoo model)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_every_model_classifies_its_inputs(name: str) -> None:
    for shape in _shapes(name):
        model = create_model(name, num_classes=7, input_shape=shape).eval()
        with torch.no_grad():
            logits = model(torch.randn(2, *shape))
        assert logits.shape == (2, 7), (name, shape)
        assert torch.isfinite(logits).all()


def test_sequence_model_takes_batches_with_or_without_channel_dim() -> None:
    model = create_model("cnn1d", 10, (40,)).eval()
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.equal(model(x), model(x.unsqueeze(1)))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_feature_taps_resolve_and_end_at_the_prelogit_feature(name: str) -> None:
    shape = _shapes(name)[0]
    model = create_model(name, 5, shape).eval()
    taps = model.feature_taps
    assert taps and len(set(taps)) == len(taps)
    captured: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(path).register_forward_hook(
            lambda _m, _i, out, path=path: captured.__setitem__(path, out)
        )
        for path in taps
    ]
    fc_input: list[torch.Tensor] = []
    fc = _classifier(model)
    handles.append(fc.register_forward_pre_hook(lambda _m, i: fc_input.append(i[0])))
    with torch.no_grad():
        model(torch.randn(2, *shape))
    for h in handles:
        h.remove()
    assert list(captured) == taps  # every tap fires, in the listed order
    assert torch.equal(captured[taps[-1]], fc_input[0])


# Published CIFAR-100 sizes of the CRD benchmark models (millions of parameters).
PUBLISHED_PARAMS_M = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn-40-2": 2.25,
    "wrn-16-2": 0.70,
    "vgg13": 9.46,
    "vgg8": 3.96,
    "resnet56": 0.86,
    "resnet20": 0.28,
    "resnet110": 1.74,
    "shufflenetv2": 1.35,
    "mobilenetv2-half": 0.81,
}


@pytest.mark.parametrize("name,millions", sorted(PUBLISHED_PARAMS_M.items()))
def test_parameter_counts_match_the_crd_benchmark(name: str, millions: float) -> None:
    count = count_params(create_model(name, 100, (3, 32, 32)))
    assert count == pytest.approx(millions * 1e6, rel=0.02)


def test_hinton_mnist_nets_have_the_paper_shapes() -> None:
    teacher = create_model("hinton-teacher", 10, (1, 28, 28))
    linears = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [1200, 1200, 10]
    dropouts = [m.p for m in teacher.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.2, 0.5, 0.5]
    assert teacher.feature_taps == ["act1", "act2"]
    plain = create_model("hinton-teacher", 10, (1, 28, 28), dropout=0.0, input_dropout=0.0)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    student = create_model("hinton-student", 10, (784,))
    assert count_params(student) == 784 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10


def test_aliases_build_the_same_architecture() -> None:
    assert count_params(create_model("wrn_40_2", 100, (3, 32, 32))) == count_params(
        create_model("wrn-40-2", 100, (3, 32, 32))
    )
    assert count_params(create_model("mobile_half", 100, (3, 32, 32))) == count_params(
        create_model("mobilenetv2", 100, (3, 32, 32), width_mult=0.5)
    )


def test_count_params_can_skip_frozen_parameters() -> None:
    model = create_model("hinton-tiny", 10, (40,))
    model.fc1.requires_grad_(False)
    frozen = model.fc1.weight.numel() + model.fc1.bias.numel()
    assert count_params(model, trainable_only=True) == count_params(model) - frozen


def test_unknown_model_names_the_nearest() -> None:
    with pytest.raises(DistillError, match="resnet8x4"):
        create_model("resnet8x5", 10, (3, 32, 32))


def test_options_a_model_does_not_take_are_listed() -> None:
    with pytest.raises(DistillError, match=r"widht.*width.*accepts: width=32, depth=3"):
        create_model("cnn", 10, (3, 32, 32), widht=64)
    with pytest.raises(DistillError, match="accepts: none"):
        create_model("resnet20", 10, (3, 32, 32), width=2)
    with pytest.raises(DistillError, match="dropout"):
        create_model("wrn-16-2", 10, (3, 32, 32), depth=28)


@pytest.mark.parametrize(
    "name,shape,kwargs,message",
    [
        ("resnet20", (40,), {}, "channels, height, width"),
        ("wrn", (3, 32, 32), {"depth": 17}, "6n\\+4"),
        ("cnn", (1, 28, 28), {"depth": 5}, "depth <= 4"),
        ("shufflenetv2", (3, 32, 32), {"net_size": 3}, "net_size must be one of"),
        ("mlp", (40,), {"hidden": [8, -1]}, "positive integers"),
        ("mlp", (40,), {"dropout": 1.5}, "dropout"),
        ("mlp", (0, 4), {}, "input_shape"),
        ("cnn1d", (3, 4, 40), {}, "sequences"),
    ],
)
def test_bad_model_settings_raise_distill_errors(name, shape, kwargs, message) -> None:
    with pytest.raises(DistillError, match=message):
        create_model(name, 10, shape, **kwargs)


def test_shapes_may_come_as_lists_or_numpy_and_torch_integers() -> None:
    import numpy as np

    model = create_model("resnet8", np.int64(4), [np.int64(1), 28, 28])
    assert model(torch.randn(2, *torch.Size([1, 28, 28]))).shape == (2, 4)
    cnn = create_model("cnn", 4, torch.Size([1, 28, 28]))
    assert cnn(torch.randn(2, 1, 28, 28)).shape == (2, 4)


def test_bad_num_classes_raises() -> None:
    with pytest.raises(DistillError, match="num_classes"):
        create_model("mlp", 0, (40,))


@settings(max_examples=25, deadline=None)
@given(
    hidden=st.lists(st.integers(1, 16), max_size=3),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    classes=st.integers(1, 6),
)
def test_mlp_maps_any_shape_to_logits(hidden: list[int], shape: list[int], classes: int) -> None:
    model = create_model("mlp", classes, shape, hidden=hidden)
    assert model(torch.randn(3, *shape)).shape == (3, classes)
    assert len(model.feature_taps) == max(len(hidden), 1)


# ----- your own model by import path -------------------------------------------------------------

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make_tiny(num_classes, input_shape, hidden=8):
        n = 1
        for d in input_shape:
            n *= d
        return nn.Sequential(
            nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    class OnlyClasses(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.fc = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.fc(x)

    def no_arguments():
        return nn.Linear(4, 3)

    def needs_option(num_classes, size):
        return nn.Linear(size, num_classes)

    def not_a_module(num_classes):
        return 42

    class nets:
        @staticmethod
        def nested(num_classes, input_shape):
            return nn.Linear(input_shape[-1], num_classes)

    CONSTANT = 5
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    name = "distill_test_user_nets"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_models_get_only_the_arguments_they_name(user_module: str) -> None:
    tiny = create_model(f"{user_module}:make_tiny", 6, (2, 3, 4), hidden=5)
    assert tiny(torch.randn(2, 2, 3, 4)).shape == (2, 6)
    assert tiny[1].out_features == 5
    only = create_model(f"{user_module}:OnlyClasses", 3, (4,))
    assert only.fc.out_features == 3
    assert isinstance(create_model(f"{user_module}:no_arguments", 3, (4,)), nn.Linear)
    nested = create_model(f"{user_module}:nets.nested", 2, (9,))
    assert nested.in_features == 9
    assert create_model(f"{user_module}:needs_option", 2, (7,), size=7).in_features == 7


def test_user_model_weights_load_too(user_module: str, tmp_path) -> None:
    source = create_model(f"{user_module}:make_tiny", 4, (6,))
    path = save_weights(source, tmp_path / "tiny.safetensors")
    copy = create_model(f"{user_module}:make_tiny", 4, (6,), weights=path)
    x = torch.randn(3, 6)
    assert torch.equal(source(x), copy(x))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("distill_no_such_module_xyz:make", "cannot import module 'distill_no_such_module_xyz'"),
        ("{mod}:make_tin", "no attribute 'make_tin'; nearest: make_tiny"),
        ("{mod}:nets.missing", "no attribute 'missing'"),
        ("{mod}:", "package.module:callable"),
        ("{mod}:CONSTANT", "not callable"),
        ("{mod}:not_a_module", "not an nn.Module"),
        ("{mod}:needs_option", "needs option size"),
    ],
)
def test_bad_user_models_raise_distill_errors(user_module: str, spec: str, message: str) -> None:
    with pytest.raises(DistillError, match=message):
        create_model(spec.format(mod=user_module), 3, (4,))


def test_user_model_wrong_option_lists_what_it_accepts(user_module: str) -> None:
    with pytest.raises(DistillError, match="accepts: num_classes, input_shape, hidden=8"):
        create_model(f"{user_module}:make_tiny", 3, (4,), hiden=4)


# ----- weight files ------------------------------------------------------------------------------


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _trained_looking(name: str, shape=(3, 32, 32), classes=10) -> nn.Module:
    """A model whose BN buffers are not at their initial values."""
    model = create_model(name, classes, shape)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *shape))
    return model


def test_safetensors_round_trip_is_exact(tmp_path) -> None:
    source = _trained_looking("resnet8")
    path = save_weights(source, tmp_path / "sub" / "r8.safetensors")
    target = create_model("resnet8", 10, (3, 32, 32))
    assert not _same_state(source, target)
    assert load_weights(target, path) is target
    assert _same_state(source, target)
    assert [p.name for p in path.parent.iterdir()] == ["r8.safetensors"]  # no temp file left
    assert (path.stat().st_mode & 0o777) == 0o644


def test_save_overwrites_atomically_and_accepts_state_dicts(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(create_model("hinton-tiny", 3, (5,)), path)
    source = create_model("hinton-tiny", 3, (5,))
    # A non-contiguous tensor, which safetensors itself refuses.
    state = dict(source.state_dict())
    state["fc.weight"] = state["fc.weight"].t().contiguous().t()
    save_weights(state, path)
    target = create_model("hinton-tiny", 3, (5,))
    load_weights(target, path)
    assert _same_state(source, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_tied_weights_save(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].weight = model[0].weight
    path = save_weights(model, tmp_path / "tied.safetensors")
    copy = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    copy[1].weight = copy[0].weight
    load_weights(copy, path)
    assert torch.equal(copy[0].weight, model[0].weight)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "best_acc": 71.5, "opt": {"lr": 0.1}},  # RepDistiller's layout
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},  # nn.DataParallel
    ],
)
def test_torch_checkpoints_load_and_unwrap(tmp_path, wrap) -> None:
    source = _trained_looking("wrn-16-1", classes=100)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(source.state_dict()), path)
    target = create_model("wrn_16_1", 100, (3, 32, 32), weights=path)
    assert _same_state(source, target)


def test_safetensors_content_is_recognised_whatever_the_suffix(tmp_path) -> None:
    source = create_model("cnn1d", 4, (40,))
    path = save_weights(source, tmp_path / "weights.bin")
    target = create_model("cnn1d", 4, (40,), weights=path)
    assert _same_state(source, target)


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    model = create_model("hinton-tiny", 3, (5,))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": model.state_dict(), "extra": _Payload(str(marker))}, path)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(DistillError, match=r"refusing to load .*evil\.pt.*arbitrary code"):
        load_weights(model, path)
    assert not marker.exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # The payload is real: a full unpickle does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_bare_malicious_pickle_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(str(marker)), protocol=2))
    with pytest.raises(DistillError, match="evil.pkl"):
        load_weights(nn.Linear(2, 2), path)
    assert not marker.exists()


def test_mismatched_weights_name_the_keys_and_change_nothing(tmp_path) -> None:
    path = save_weights(create_model("resnet8", 100, (3, 32, 32)), tmp_path / "r8.safetensors")

    deeper = create_model("resnet14", 100, (3, 32, 32))
    with pytest.raises(DistillError, match=r"missing: layer1\.1\.conv1\.weight"):
        load_weights(deeper, path)

    fewer_classes = create_model("resnet8", 10, (3, 32, 32))
    before = {k: v.clone() for k, v in fewer_classes.state_dict().items()}
    with pytest.raises(DistillError, match=r"fc\.weight \(file \[100, 64\], model \[10, 64\]\)"):
        load_weights(fewer_classes, path)
    assert all(torch.equal(before[k], v) for k, v in fewer_classes.state_dict().items())

    shallower = create_model("resnet8", 100, (3, 32, 32))
    extra = {**shallower.state_dict(), "extra.weight": torch.zeros(1)}
    torch.save({"model": extra}, tmp_path / "x.pt")
    with pytest.raises(DistillError, match=r"unexpected: extra\.weight"):
        load_weights(shallower, tmp_path / "x.pt")


@pytest.mark.parametrize(
    "content,suffix",
    [(None, ".pt"), (b"", ".pt"), (b"not a checkpoint at all", ".pth"), (b"junk", ".safetensors")],
)
def test_missing_or_invalid_files_name_the_path(tmp_path, content, suffix) -> None:
    path = tmp_path / f"weights{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DistillError, match=str(path)):
        load_weights(nn.Linear(2, 2), path)


def test_checkpoint_without_a_state_dict_is_explained(tmp_path) -> None:
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(DistillError, match="no state dict"):
        load_weights(nn.Linear(2, 2), path)


def test_registry_lists_the_zoo() -> None:
    expected = {
        "mlp", "hinton-teacher", "hinton-student", "hinton-tiny", "cnn", "cnn1d",
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4", "wrn", "wrn-16-1", "wrn-16-2", "wrn-16-4", "wrn-28-4",
        "wrn-40-1", "wrn-40-2", "wrn_16_2", "wrn_40_2", "vgg8", "vgg11", "vgg13", "vgg16",
        "vgg19", "mobilenetv2", "mobilenetv2-half", "shufflenetv2",
    }  # fmt: skip
    assert expected <= set(model_names())
    assert set(MODELS) == set(model_names())
