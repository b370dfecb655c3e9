"""Config parsing: defaults, -S overrides, and errors that name the key and the expected type."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from components.core.config import ParamsError, load_params, parse_override

runner = CliRunner()


def test_repo_params_yaml_is_valid_and_complete():
    cfg = load_params("params.yaml")
    raw = yaml.safe_load(open("params.yaml"))
    # every section in the file is a known stage section and round-trips
    assert set(raw) <= set(cfg.to_dict())
    assert cfg.data.image_size == raw["data"]["image_size"]


def test_override_uses_dvc_syntax_and_yaml_types():
    cfg = load_params("params.yaml", ["train.steps=7", "train.editors.prefix.layers=[0, 2]", "data.seed=3"])
    assert cfg.train.steps == 7
    assert cfg.train.editors.prefix.layers == [0, 2]
    assert cfg.data.seed == 3


@pytest.mark.parametrize("spec, expected", [("all", "all"), ("1-22", "1-22"), ("odd", "odd"), ([3, 1, 3], [1, 3]), (5, [5])])
def test_layer_specs(spec, expected):
    cfg = load_params("params.yaml", [f"train.editors.visual.layers={spec}"])
    assert cfg.train.editors.visual.layers == expected


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"unknown key 'train\.stepz'"):
        load_params("params.yaml", ["train.stepz=3"])


def test_bad_value_names_key_and_type():
    with pytest.raises(ParamsError) as exc:
        load_params("params.yaml", ["train.editors.prefix.rank=abc"])
    msg = str(exc.value)
    assert "train.editors.prefix.rank" in msg and "expected int" in msg and "'abc'" in msg


def test_out_of_range_value_is_named():
    with pytest.raises(ParamsError, match=r"train\.lr"):
        load_params("params.yaml", ["train.lr=-1"])


def test_bad_layer_word_lists_the_choices():
    with pytest.raises(ParamsError, match=r"train\.editors\.suffix\.layers.*first_half"):
        load_params("params.yaml", ["train.editors.suffix.layers=middle"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ParamsError, match="section.key=value"):
        parse_override("train.steps")
    with pytest.raises(ParamsError, match="not found"):
        load_params("nope/params.yaml")


def test_broken_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match=str(bad)):
        load_params(bad)


def test_cli_params_prints_resolved_config():
    res = runner.invoke(app, ["params", "-S", "train.steps=11"])
    assert res.exit_code == 0, res.output
    printed = yaml.safe_load(res.output)
    assert printed["train"]["steps"] == 11
    assert "validate" in printed


def test_cli_bad_param_exits_2_naming_key():
    res = runner.invoke(app, ["params", "-S", "data.image_size=big"])
    assert res.exit_code == 2
    assert "data.image_size" in res.output and "expected int" in res.output


def test_params_yaml_spells_out_every_key():
    """DVC tracks what is in the file: a default missing from params.yaml would change runs untracked."""
    cfg = load_params("params.yaml")
    raw = yaml.safe_load(open("params.yaml"))

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, prefix + k + ".")
        return out

    assert keys(cfg.to_dict()) == keys(raw)


def _first_difference(a, b, prefix=""):
    """The first dotted key where `a` and `b` differ, with both values; None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return prefix + k, a.get(k, "<absent>"), b.get(k, "<absent>")
            found = _first_difference(a[k], b[k], prefix + k + ".")
            if found:
                return found
        return None
    return None if a == b else (prefix.rstrip("."), a, b)


def test_params_yaml_equals_the_defaults():
    """config.py's defaults are the only ones: params.yaml is them written out (`mrt params --defaults`)."""
    from components.core.config import Params

    found = _first_difference(Params().to_dict(), load_params("params.yaml").to_dict())
    assert found is None, "params.yaml differs from the defaults in components/core/config.py at {}: default {!r}, params.yaml {!r}".format(*found)


def test_cli_params_defaults_prints_what_params_yaml_resolves_to(tmp_path):
    res = runner.invoke(app, ["params", "--defaults", "-p", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 0, res.output
    fresh = tmp_path / "params.yaml"
    fresh.write_text(res.output)
    assert load_params(fresh).to_dict() == load_params("params.yaml").to_dict()
    assert yaml.safe_load(res.output) == load_params("params.yaml").to_dict()


def test_learning_rate_is_one_number_or_one_per_method():
    one = load_params("params.yaml", ["train.lr=0.002", "train.method=lora"]).train
    assert one.learning_rate == 0.002
    per = load_params("params.yaml", ["train.lr={mrt: 0.003, lora: 0.0006, full: 0.0001}"]).train
    assert [per.model_copy(update={"method": m}).learning_rate for m in ("mrt", "lora", "full")] == [0.003, 0.0006, 0.0001]
    assert [per.rate_for(m) for m in ("mrt", "lora", "full", "frozen")] == [0.003, 0.0006, 0.0001, None]
    assert one.rate_for("frozen") is None and one.rate_for("full") == 0.002
    nested = load_params("params.yaml", ["train.lr={mrt: 0.003, lora: 0.0006, full: 0.0001}", "train.lr.lora=0.001"]).train
    assert nested.lr == {"mrt": 0.003, "lora": 0.001, "full": 0.0001}


@pytest.mark.parametrize("value, expect", [
    ("{lora: 0.001}", r"lr has no entry for method 'mrt'.*lr\.mrt"),
    ("{mrt: 0.001, adam: 0.1}", r"train\.lr.*keys mrt, lora, full.*adam"),
    ("{mrt: -0.001}", r"train\.lr.*for mrt must be a finite number > 0"),
    ("{mrt: .nan}", r"train\.lr.*for mrt must be a finite number > 0"),
    ("inf", r"train\.lr.*finite number > 0"),
    ("fast", r"train\.lr.*must be a number, got 'fast'"),
])
def test_bad_learning_rates_are_named(value, expect):
    with pytest.raises(ParamsError, match=expect):
        load_params("params.yaml", [f"train.lr={value}"])
