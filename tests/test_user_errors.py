"""Mistakes in the user's input: one ``error:`` line on stderr, exit status 2, saying what to do."""

import socket
import time
from pathlib import Path

import pytest
import yaml

import distill
from distill.cli import build_parser, main
from distill.data import mnist
from distill.data.download import fetch_files
from distill.errors import DistillError
from distill.models.weights import read_state_dict
from distill.recipes import load_recipe

pytestmark = pytest.mark.fast

RECIPE = {
    "name": "tiny",
    "seeds": [0],
    "threads": 1,
    "data": {"name": "digits", "val_fraction": 0.1},
    "teacher": {"model": "mlp", "kwargs": {"hidden": [16]}, "train": {"epochs": 1, "lr": 0.01, "batch_size": 64}},
    "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
    "train": {"epochs": 3, "lr": 0.02, "batch_size": 64, "optimizer": "sgd"},
    "distill": {"terms": [{"loss": "kd"}]},
}


from test_cli import run_cli, write  # noqa: E402  (the same helpers as the CLI tests)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 1. --out names an existing file


def test_out_that_is_a_file_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    started = time.perf_counter()
    code, _, err = run_cli(["run", write(tmp_path, RECIPE), "--out", str(out), "--quiet"], capsys)
    line = one_error_line(err)
    assert code == 2 and str(out) in line and "is a file" in line and "directory" in line
    assert out.read_text() == "keep me"
    assert time.perf_counter() - started < 5  # nothing was trained
    code, _, err = run_cli(["run", write(tmp_path, RECIPE), "--out", str(out / "sub"), "--quiet"], capsys)
    assert code == 2 and "is a file" in one_error_line(err)


# 2. misspelled fields


def test_misspelled_field_in_yaml_names_the_field_and_the_nearest(tmp_path):
    recipe = yaml.safe_load(yaml.safe_dump(RECIPE))
    recipe["teacher"]["modle"] = recipe["teacher"].pop("model")
    recipe["train"]["lrr"] = 0.1
    recipe["distill"]["terms"][0]["wieght"] = 2.0
    with pytest.raises(DistillError) as err:
        load_recipe(write(tmp_path, recipe))
    message = str(err.value)
    assert "teacher.modle: unknown field; nearest: model" in message
    assert "train.lrr: unknown field; nearest: lr" in message
    assert "distill.terms.0.wieght: unknown field; nearest: weight" in message
    assert "more problem" not in message and "Field required" not in message
    assert "\n" not in message


def test_misspelled_field_in_set_is_named_with_the_nearest(tmp_path, capsys):
    code, _, err = run_cli(["check", write(tmp_path, RECIPE), "--set", "teacher.modle=cnn",
                            "--set", "train.epoch=2"], capsys)
    line = one_error_line(err)
    assert code == 2
    assert "teacher.modle: unknown field; nearest: model" in line
    assert "train.epoch: unknown field; nearest: epochs" in line


def test_every_validation_problem_is_listed():
    recipe = {**RECIPE, "train": {"epochs": 0, "lr": "fast"}, "seeds": [-1]}
    with pytest.raises(DistillError) as err:
        load_recipe(recipe)
    message = str(err.value)
    assert "train.epochs:" in message and "train.lr:" in message and "seeds.0:" in message
    assert "more problem" not in message


# 3. a directory as weights


def test_weights_directory_says_a_file_is_expected(tmp_path, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(DistillError, match="is a directory") as err:
        read_state_dict(folder)
    assert ".safetensors" in str(err.value) and ".pt" in str(err.value)
    code, _, err = run_cli(["export", "mlp", "--input-shape", "1,8,8", "--weights", str(folder),
                            "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")], capsys)
    line = one_error_line(err)
    assert code == 2 and "is a directory" in line and "not found" not in line
    code, _, err = run_cli(["check", write(tmp_path, RECIPE), "--set", f"teacher.weights={folder}",
                            "--set", "teacher.train=null"], capsys)
    assert code == 2 and "is a directory" in one_error_line(err)


# 4. --version


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"distill {distill.__version__}"


# 5. a stage's train: is a partial override of train:


def test_help_example_of_set_is_the_top_level_schedule():
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # noqa: SLF001
    text = " ".join(run.format_help().split())
    assert "--set train.epochs=5" in text and "distill.train.epochs" not in text


def test_set_stage_train_field_keeps_the_rest_of_the_recipe_schedule():
    recipe = load_recipe("demo", ["distill.train.epochs=5"])
    assert recipe.distill.train.epochs == 5
    assert recipe.distill.train.lr == recipe.train.lr == 0.01
    assert recipe.distill.train.checkpoint_every == 50 and recipe.distill.train.batch_size == 128
    assert recipe.baseline.train is None and recipe.train.epochs == 300


def test_yaml_stage_train_is_merged_over_train(tmp_path):
    recipe = {**RECIPE, "distill": {**RECIPE["distill"], "train": {"epochs": 7}},
              "baseline": {"train": {"lr": 0.5}},
              "assistants": [{"model": "mlp", "kwargs": {"hidden": [12]}, "train": {"batch_size": 32}}]}
    r = load_recipe(write(tmp_path, recipe))
    assert (r.distill.train.epochs, r.distill.train.lr, r.distill.train.optimizer) == (7, 0.02, "sgd")
    assert (r.baseline.train.epochs, r.baseline.train.lr) == (3, 0.5)
    assert (r.assistants[0].train.batch_size, r.assistants[0].train.lr) == (32, 0.02)
    assert r.teacher.train.epochs == 1 and r.teacher.train.optimizer == "adam"  # the teacher's own schedule


def test_bad_value_in_train_is_reported_once():
    recipe = {**RECIPE, "train": {"lr": "fast"}, "distill": {**RECIPE["distill"], "train": {"epochs": 2}}}
    with pytest.raises(DistillError) as err:
        load_recipe(recipe)
    message = str(err.value)
    assert "train.lr:" in message and "distill.train.lr" not in message


# 6. a failed download


def test_failed_fetch_is_one_short_line_with_the_fix(tmp_path):
    port = dead_port()
    with pytest.raises(DistillError) as err:
        fetch_files([f"http://127.0.0.1:{port}/a/", f"http://127.0.0.1:{port}/b/"],
                    {"t10k-labels-idx1-ubyte.gz": None}, tmp_path / "mnist")
    message = str(err.value)
    assert "\n" not in message and len(message) < 400
    assert "t10k-labels-idx1-ubyte.gz" in message and f"127.0.0.1:{port}/a/" in message
    assert "data.options.path" in message and "--data-dir" in message
    assert message.count("could not") == 1


def test_offline_download_in_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(mnist._SETS["mnist"], "mirrors", [])  # noqa: SLF001  never the real site from a test
    recipe = {**RECIPE, "data": {"name": "mnist", "options": {"mirror": f"http://127.0.0.1:{dead_port()}/"}}}
    data_dir = tmp_path / "data"
    code, _, err = run_cli(["check", write(tmp_path, recipe), "--data-dir", str(data_dir)], capsys)
    line = one_error_line(err)
    assert code == 2 and "data.options.path" in line and "--data-dir" in line and len(line) < 400
    assert not data_dir.exists(), "the empty folder the failed attempt made is removed"
    kept = tmp_path / "kept"
    (kept / "other").mkdir(parents=True)
    code, _, err = run_cli(["check", write(tmp_path, recipe), "--data-dir", str(kept)], capsys)
    assert code == 2 and sorted(p.name for p in kept.iterdir()) == ["other"]


# 7. a header-less TSV


def test_headerless_tsv_error_is_short(tmp_path):
    from distill.nlp.data import read_labelled_tsv

    path = tmp_path / "train.tsv"
    path.write_text("a very long first sentence that goes on and on " * 10 + "\t1\nanother\t0\n")
    with pytest.raises(DistillError) as err:
        read_labelled_tsv(path)
    message = str(err.value)
    assert "sentence<TAB>label" in message and "header" in message
    assert len(message) < len(str(path)) + 200 and "\n" not in message


# data.options are typed per data set (distill.data.DataOptions, from each builder's signature)


@pytest.mark.parametrize("options, expected", [
    ({"test_fraction": "a fifth"}, r"data\.options\.test_fraction \(data set 'digits'\): input should be a valid number.*\(given: 'a fifth'\)"),
    ({"test_fraction": 0.2, "sed": 1}, r"data set 'digits' has no option 'sed'; accepted options: test_fraction, seed"),
    ({"seed": 1.5}, r"data\.options\.seed \(data set 'digits'\): input should be a valid integer"),
])
def test_a_wrong_data_option_is_refused_at_load_before_any_work(tmp_path, capsys, options, expected):
    data = {**RECIPE, "data": {**RECIPE["data"], "options": options}}
    with pytest.raises(DistillError, match=expected):
        load_recipe(data)
    code, _, err = run_cli(["check", write(tmp_path, data)], capsys)
    assert code == 2 and "data" in one_error_line(err)


def test_data_options_are_converted_to_their_declared_types(tmp_path):
    from distill.data import DATASETS, load_dataset
    from distill.data.registry import parse_data_options

    model = DATASETS.get("mnist-detection").Options
    assert list(model.model_fields)[:3] == ["path", "download", "mirror"]
    # a YAML list becomes the declared tuple; only the options given are handed on
    assert parse_data_options("mnist-detection", model, {"digits": [1, 2]}) == {"digits": (1, 2)}
    data = load_dataset("mnist1d", tmp_path, num_samples=600.0, seed=3)  # an integral float is an int
    assert len(data.train) + len(data.test) == 600


def test_the_text_tasks_own_data_sets_are_typed_too(tmp_path):
    base = {"name": "t", "task": "text-classification", "seeds": [0],
            "teacher": {"model": "bilstm", "train": {"epochs": 1}}, "student": {"model": "bilstm"},
            "distill": {"terms": [{"loss": "kd"}]}}
    with pytest.raises(DistillError, match="data set 'tsv' needs the option train"):
        load_recipe({**base, "data": {"name": "tsv", "options": {"test": "t.tsv"}}})
    with pytest.raises(DistillError, match=r"data\.options\.num_classes \(data set 'tsv'\): input should be greater than or equal to 2"):
        load_recipe({**base, "data": {"name": "tsv", "options": {"train": "a", "test": "b", "num_classes": 1}}})
    with pytest.raises(DistillError, match="data set 'sst2' has no option 'paht'; accepted options: path, verify"):
        load_recipe({**base, "data": {"name": "sst2", "options": {"paht": "x"}}})
    with pytest.raises(DistillError, match=r"data\.options\.verify \(data set 'sst2'\): input should be a valid boolean"):
        load_recipe({**base, "data": {"name": "sst2", "options": {"verify": "perhaps"}}})


def test_every_built_in_data_set_types_all_its_options(tmp_path):
    """One annotation that does not resolve (stsb's return type is imported inside a function) must
    not leave the builder's other options unchecked."""
    import typing

    import distill.nlp.stsb  # noqa: F401  (registers stsb)
    from distill.data import DATASETS, load_dataset
    from distill.data.registry import DataOptions, _AnyOptions, parse_data_options

    untyped = {n: [k for k, f in DATASETS.get(n).Options.model_fields.items() if f.annotation is typing.Any]
               for n in DATASETS.names()}
    assert not any(untyped.values()), untyped
    with pytest.raises(DistillError, match=r"data\.options\.verify \(data set 'stsb'\): input should be a valid boolean.*'maybe'"):
        parse_data_options("stsb", DATASETS.get("stsb").Options, {"verify": "maybe"})
    assert parse_data_options("stsb", DATASETS.get("stsb").Options, {"verify": "no"}) == {"verify": False}
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question " * 20)
    assert len(load_dataset("text", tmp_path, path=text, block_size=8).train) > 0  # a Path, as before
    # an untyped builder's options come back as given, whatever their names
    assert parse_data_options("x", _AnyOptions, {"copy": 1, "json": "a"}) == {"copy": 1, "json": "a"}
    assert issubclass(_AnyOptions, DataOptions)
