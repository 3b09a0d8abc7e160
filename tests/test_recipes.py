import pytest

from distill.errors import DistillError
from distill.recipes import apply_override, load_recipe, preset_names

pytestmark = pytest.mark.fast

BASE = {
    "name": "t",
    "data": {"name": "digits"},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [32]}, "train": {"epochs": 1}},
    "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
    "distill": {"terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9}]},
}


def test_valid_recipe_and_defaults():
    r = load_recipe(BASE)
    assert r.baseline.terms[0].loss == "ce"
    assert [t.name for t in r.distill.terms] == ["ce", "kd"]
    assert r.train.epochs == 10


def test_overrides_nested_and_list_index():
    r = load_recipe(BASE, ["distill.terms.1.weight=0.5", "train.epochs=3", "seeds=[1, 2]"])
    assert r.distill.terms[1].weight == 0.5 and r.train.epochs == 3 and r.seeds == [1, 2]


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochs=zero", "train.epochs: Input should be a valid integer"),
        ("train.epoch=3", "train.epoch: unknown field; nearest: epochs"),
        ("distill.terms.0.loss=kld", "unknown loss 'kld'"),
        ("student.model=resnet9", "unknown model 'resnet9'"),
        ("data.name=mnits", "unknown data set 'mnits'"),
        ("distill.terms.1.params={temp: 2}", "no parameter 'temp'"),
        ("distill.terms.9.weight=1", "not an index"),
        ("train.epochs", "expects key.sub=value"),
        ("baseline.terms=[{loss: kd}]", "needs a teacher"),
    ],
)
def test_bad_recipes_name_the_problem(override, message):
    with pytest.raises(DistillError, match=message.replace("[", r"\[").replace("{", r"\{")):
        load_recipe(BASE, [override])


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: digits\nteacher: [")
    with pytest.raises(DistillError, match="not valid YAML at line"):
        load_recipe(bad)
    with pytest.raises(DistillError, match="neither a file nor a preset"):
        load_recipe(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(DistillError, match="must be a YAML mapping"):
        load_recipe(listy)


def test_teacher_needs_weights_or_training():
    data = {**BASE, "teacher": {"model": "mlp"}}
    with pytest.raises(DistillError, match="teacher needs 'weights'"):
        load_recipe(data)


def test_every_preset_validates():
    names = preset_names()
    assert {"demo", "mnist", "fashion-mnist", "cifar10-resnet"} <= set(names)
    for name in names:
        load_recipe(name)


def test_apply_override_creates_sections():
    data = {}
    apply_override(data, "a.b.c=3")
    assert data == {"a": {"b": {"c": 3}}}
