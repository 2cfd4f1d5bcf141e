"""Run specs: strict pydantic models, loadable from YAML / TOML / JSON, overridden by flags."""

import json

import pytest

from deftcli.errors import DeftError
from deftcli.specs import EvalSpec, FinetuneSpec, PretrainSpec, SampleSpec, build_spec


@pytest.mark.parametrize(
    "suffix, text",
    [
        (".yaml", "iterations: 7\noperator:\n  name: blur\n  params: {kernel_std: 1.5}\n"),
        (".toml", "iterations = 7\n[operator]\nname = 'blur'\n[operator.params]\nkernel_std = 1.5\n"),
        (".json", json.dumps({"iterations": 7, "operator": {"name": "blur", "params": {"kernel_std": 1.5}}})),
    ],
)
def test_spec_files_in_every_format(tmp_path, suffix, text):
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    spec = build_spec(FinetuneSpec, path)
    assert spec.iterations == 7 and spec.operator.name == "blur" and spec.operator.params == {"kernel_std": 1.5}


def test_flags_override_the_file_field_by_field(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("iterations: 7\nlr: 0.001\noperator: {name: superres, params: {factor: 2}}\n")
    spec = build_spec(FinetuneSpec, path, {"lr": 0.01, "operator.params": {"sigma": 0.1}, "seed": None})
    assert spec.iterations == 7 and spec.lr == 0.01 and spec.seed == 0
    assert spec.operator.params == {"factor": 2, "sigma": 0.1}


@pytest.mark.parametrize("model", [FinetuneSpec, SampleSpec, EvalSpec, PretrainSpec])
def test_unknown_keys_are_rejected_with_the_field_name(tmp_path, model):
    path = tmp_path / "spec.yaml"
    path.write_text("not_a_field: 1\n")
    with pytest.raises(DeftError, match="not_a_field: unknown field"):
        build_spec(model, path)


@pytest.mark.parametrize(
    "text, field",
    [
        ("lr: -1\n", "lr"),
        ("iterations: lots\n", "iterations"),
        ("time_steps: 1\n", "time_steps"),
        ("method: adjoint\n", "method"),
        ("hnet: {model_channels: 0}\n", "hnet.model_channels"),
    ],
)
def test_out_of_range_and_wrong_types_name_the_field(tmp_path, text, field):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(DeftError, match=field.replace(".", r"\.")) as info:
        build_spec(FinetuneSpec, path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("suffix, text", [(".yaml", "a: [1, 2\n"), (".toml", "a = = 1\n"), (".json", "{bad json")])
def test_malformed_files_are_one_line_errors(tmp_path, suffix, text):
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    with pytest.raises(DeftError, match="not a valid") as info:
        build_spec(FinetuneSpec, path)
    assert "\n" not in str(info.value)


def test_a_spec_must_be_a_mapping_and_must_exist(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(DeftError, match="mapping"):
        build_spec(FinetuneSpec, path)
    with pytest.raises(DeftError, match="no such spec file"):
        build_spec(FinetuneSpec, tmp_path / "missing.yaml")


def test_resolved_specs_round_trip_through_json():
    spec = build_spec(FinetuneSpec, overrides={"operator.name": "inpaint", "hnet.channel_mult": [1, 2, 2]})
    again = FinetuneSpec.model_validate(json.loads(json.dumps(spec.model_dump(mode="json"))))
    assert again == spec
