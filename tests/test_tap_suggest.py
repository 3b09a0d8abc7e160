"""Tap suggestions: linear CKA's invariances, relative depth, the pairs chosen for identical and
for different networks, and `distill check --suggest-taps` whose YAML pastes into a working recipe."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from torch import nn

from distill.cli import main
from distill.models import create_model
from distill.tap_suggest import features_for_cka, linear_cka, relative_depths, suggest_taps

pytestmark = pytest.mark.fast

torch.set_num_threads(1)


def features(n: int = 200, p: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_cka_of_identical_features_is_one():
    x = features()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x = features()
    y = torch.tanh(x @ features(12, 7, seed=1)) + 0.3 * features(200, 7, seed=2)  # a related feature
    q, _ = torch.linalg.qr(features(12, 12, seed=3))
    base = linear_cka(x, y)
    assert 0.1 < base < 0.99
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(y, x) == pytest.approx(base, abs=1e-12)  # symmetric


def test_cka_is_not_invariant_to_arbitrary_linear_maps_and_is_low_for_unrelated_features():
    x = features(p=4)
    stretch = torch.diag(torch.tensor([1.0, 1.0, 1.0, 50.0], dtype=torch.float64))
    assert linear_cka(x, x @ stretch) < 0.9
    assert linear_cka(features(500, 5, seed=4), features(500, 5, seed=5)) < 0.1


def test_conv_maps_are_averaged_over_space():
    t = torch.randn(4, 3, 5, 6)
    assert torch.equal(features_for_cka(t), t.mean((2, 3)))
    assert features_for_cka(t, pool=False).shape == (4, 90)


def test_relative_depth_follows_execution_order():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    depths = relative_depths(model, torch.randn(2, 4))
    # modules finish in the order 0, 1, 2.0, 2.1, 2 (a block after its last submodule)
    assert depths == pytest.approx({"0": 1 / 5, "1": 2 / 5, "2.0": 3 / 5, "2.1": 4 / 5, "2": 1.0})


def test_identical_networks_pair_each_layer_with_itself():
    torch.manual_seed(0)
    teacher = create_model("resnet8x4", 10, (3, 16, 16))
    student = copy.deepcopy(teacher)
    x = torch.randn(32, 3, 16, 16)
    found = suggest_taps(teacher, student, x, top=10)
    assert [(p.student, p.teacher) for p in found.pairs] == [(t, t) for t in student.feature_taps]
    assert all(p.cka == pytest.approx(1.0) and p.score == pytest.approx(1.0) for p in found.pairs)


def test_pairs_between_different_networks_do_not_cross_or_repeat():
    torch.manual_seed(0)
    teacher, student = create_model("resnet20", 10, (3, 16, 16)), create_model("resnet8", 10, (3, 16, 16))
    found = suggest_taps(teacher, student, torch.randn(32, 3, 16, 16), top=3)
    pairs = found.pairs
    assert 1 <= len(pairs) <= 3
    assert len({p.student for p in pairs}) == len(pairs) == len({p.teacher for p in pairs})
    assert [p.teacher_depth for p in pairs] == sorted(p.teacher_depth for p in pairs)  # shallow to deep
    assert found.candidates[0].score >= found.candidates[-1].score
    for p in found.candidates:
        assert p.score == pytest.approx(p.cka - abs(p.student_depth - p.teacher_depth))


RECIPE = {
    "name": "taps",
    "seeds": [0],
    "threads": 1,
    "data": {"name": "digits"},
    "teacher": {"model": "cnn", "kwargs": {"width": 16}, "train": {"epochs": 1}},
    "student": {"model": "cnn", "kwargs": {"width": 4, "depth": 2}},
    "distill": {"terms": [{"loss": "kd"}]},
}


def test_check_suggest_taps_prints_pairs_and_a_yaml_snippet_that_works(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    assert main(["check", str(path), "--suggest-taps", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "tap pairs: relative depth and linear CKA" in out and "the teacher is untrained here" in out
    snippet = out[out.index("# hint terms proposed"):].split("\n\n")[0]
    terms = yaml.safe_load(snippet)
    assert 1 <= len(terms) <= 2 and all(t["loss"] == "hint" for t in terms)
    recipe = copy.deepcopy(RECIPE)
    recipe["distill"]["terms"] += terms
    path.write_text(yaml.safe_dump(recipe))
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert all(f"adapter for '{t['name']}'" in out for t in terms)
