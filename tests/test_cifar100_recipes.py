"""The CIFAR-100 recipes (recipes/cifar100/): the CRD protocol, and a clean `distill check` of each.

The check runs offline on a tiny fake CIFAR-100 archive with batches of 4: it builds the untrained
teacher and student, dry-runs the baseline and distill objectives on one batch and must report no
problem (every term finite, non-zero and giving the student a gradient).
"""

from pathlib import Path

import pytest

from distill.check import check_recipe
from distill.recipes.loader import load_recipe
from test_cifar100 import write_fake_cifar100

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "cifar100"
METHODS = ["kd", "fitnet", "at", "nst", "fsp", "vid", "reviewkd", "sp", "rkd", "pkt", "cc", "crd", "crd-kd",
           "dkd", "dist", "kd-std"]
EXPECTED = sorted(
    [f"resnet32x4-resnet8x4-{m}.yaml" for m in METHODS]
    + ["wrn40_2-wrn16_2-kd.yaml", "vgg13-vgg8-kd.yaml", "resnet32x4-shufflenetv2-kd.yaml"]
    # no teacher network for the student, and several teachers
    + ["resnet32x4-resnet8x4-tfkd.yaml", "resnet32x4-resnet8x4-ensemble-kd.yaml",
       "wrn40_2-wrn16_2-ta-kd.yaml", "resnet8x4-resnet8x4-ban-kd.yaml", "resnet32x4-resnet8x4-dml.yaml"]
)
FILES = sorted(p.name for p in RECIPES.glob("*.yaml"))


def test_every_recipe_is_there():
    assert FILES == EXPECTED


@pytest.mark.parametrize("file", FILES)
def test_recipe_follows_the_crd_protocol(file):
    recipe = load_recipe(RECIPES / file)
    assert recipe.data.name == "cifar100"
    assert recipe.data.augment.crop_padding == 4 and recipe.data.augment.flip
    small_student = recipe.student.model in ("shufflenetv2", "mobilenetv2", "mobilenetv2-half")
    for spec, lr in ((recipe.train, 0.01 if small_student else 0.05), (recipe.teacher.train, 0.05)):
        assert (spec.epochs, spec.batch_size, spec.optimizer, spec.lr) == (240, 64, "sgd", lr)
        assert (spec.momentum, spec.weight_decay, spec.schedule) == (0.9, 5e-4, "step")
        assert (spec.milestones, spec.gamma) == ([150, 180, 210], 0.1)
    weights = {t.loss: t.weight for t in recipe.distill.terms}
    if file.endswith("-kd.yaml") and "crd" not in file:
        assert weights == {"ce": 0.1, "kd": 0.9}
        assert recipe.distill.terms[1].params == {"temperature": 4.0}
    else:
        assert weights["ce"] == 1.0


@pytest.fixture(scope="module")
def fake_cifar100(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    write_fake_cifar100(root, train=16, test=8)
    return root / "cifar-100-binary"


@pytest.mark.parametrize("file", FILES)
def test_recipe_checks_clean(file, fake_cifar100, tmp_path):
    recipe = load_recipe(RECIPES / file, [
        f"data.options.path={fake_cifar100}",
        "train.batch_size=4",
        "teacher.train.batch_size=4",
        "data.eval_batch_size=4",
    ])
    report = check_recipe(recipe, data_dir=tmp_path / "data")
    assert report.problems == []
    assistants = {f"assistant{i + 1}" for i in range(len(recipe.assistants))}
    assert set(report.stages) == {"baseline", "distill"} | assistants
    terms = report.stages["distill"].terms
    names = {t.name for t in recipe.distill.terms}
    if recipe.distill.peers > 1:  # mutual learning: every peer has each term
        names = {f"{n}_{i}" for n in names for i in range(recipe.distill.peers)}
    assert set(terms) == names
