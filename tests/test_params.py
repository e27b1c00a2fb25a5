"""params.yaml validation: every bad value names its key path and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from components.params import (
    ParamsError,
    apply_profile,
    available_profiles,
    load_params,
    parse_params,
    profile_params,
)
from orchestration.settings import SECTION, load_settings, parse_settings
from tests.fixtures.processes import REPO_ROOT

DEFAULT = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def with_value(path: str, value: object) -> dict:
    raw = copy.deepcopy(DEFAULT)
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


def test_default_params_load() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.profile == "default"
    assert params.environment.frame_skip == 4
    assert params.environment.actions[0].name == "noop"


def defaults_that_differ(name: str, section: BaseModel) -> list[str]:
    """The keys of ``section`` (validated from params.yaml) whose default in code is another value."""
    fields = type(section).model_fields
    required = {key: getattr(section, key) for key, field in fields.items() if field.is_required()}
    defaults = type(section).model_validate(required).model_dump()
    return [f"{name}.{key}: code {defaults[key]!r}, params.yaml {value!r}"
            for key, value in section.model_dump().items() if defaults[key] != value]


def test_code_defaults_are_the_values_in_params_yaml() -> None:
    """One source for every value: each default written in components/params.py (and in orchestration/settings.py,
    which owns the orchestration section) is params.yaml's value, so code that builds a section without
    params.yaml (tests, notebooks) behaves as the pipeline does."""
    params = parse_params(copy.deepcopy(DEFAULT))
    sections = {name: getattr(params, name) for name in type(params).model_fields}
    sections[SECTION] = parse_settings(DEFAULT[SECTION])
    differ = [line for name, section in sections.items() if isinstance(section, BaseModel)
              for line in defaults_that_differ(name, section)]
    assert differ == [], "\n".join(differ)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("rl_agent.ppo.n_steps", -5, "rl_agent.ppo.n_steps: must be > 0, got -5"),
        ("rl_agent.ppo.n_steps", "many", "rl_agent.ppo.n_steps: Input should be a valid integer"),
        ("environment.frame_skip", 0, "environment.frame_skip: must be > 0, got 0"),
        ("diffusion_checkpoint.terminal_share", 1.0, "diffusion_checkpoint.terminal_share: must be < 1"),
        ("diffusion_checkpoint.moving_weight", 0, "diffusion_checkpoint.moving_weight: must be > 0.0, got 0"),
        ("distilled_model.moving_weight", -2.0, "distilled_model.moving_weight: must be > 0.0, got -2.0"),
        ("raw_trajectories.random_action_fraction", 1.5, "raw_trajectories.random_action_fraction: must be <= 1"),
        ("raw_trajectories.policy", "expert", "raw_trajectories.policy: must be one of 'agent' or 'random'"),
        ("raw_trajectories.shards", [0, 0], "raw_trajectories.shards: must be distinct"),
        ("environment.resolution", [8, 6], "environment.resolution: must be (width, height)"),
        ("environment.typo_key", 1, "environment.typo_key: unknown key"),
        ("evaluation.ablations.overrides", ["steps=5"], "evaluation.ablations.overrides: must be "
         "'section.key=value' strings"),
        ("distilled_model.teacher_noise", "random",
         "distilled_model.teacher_noise: must be one of 'fresh' or 'frozen'"),
        ("autoencoder.mixed_precision", "fp16", "autoencoder.mixed_precision: must be one of 'no' or 'bf16'"),
        ("distilled_model.mixed_precision", "fp8", "distilled_model.mixed_precision: must be one of 'no', 'fp16'"),
        ("autoencoder.decoder_block_out_channels", [32, 64], "decoder_block_out_channels [32, 64] needs one width "
         "per block of block_out_channels [32, 64, 64]"),
        ("autoencoder.decoder_block_out_channels", [32, 24, 64], "norm_num_groups 16 must divide every "
         "decoder_block_out_channels, not [24]"),
        ("validated_latents.engine", "tensorrt", "validated_latents.engine: must be one of 'onnxruntime' or 'torch'"),
    ],
)
def test_bad_value_names_key_and_rule(path: str, value: object, message: str) -> None:
    with pytest.raises(ParamsError) as error:
        parse_params(with_value(path, value))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("retraining_cron", "every sunday", "orchestration.retraining_cron: must be a 5-field cron string"),
        ("retraining_timezone", "", "orchestration.retraining_timezone: must have at least 1 character(s)"),
        ("pull_before_repro", "maybe", "orchestration.pull_before_repro: Input should be a valid boolean"),
        ("typo_key", 1, "orchestration.typo_key: unknown key (check the spelling; allowed keys are listed in "
         "orchestration/settings.py)"),
    ],
)
def test_bad_orchestration_value_names_key_and_rule(tmp_path: Path, key: str, value: object, message: str) -> None:
    """orchestration/ validates its own section (components keeps it as a mapping): the Dagster definitions and
    every materialization read it through ``load_settings``, which names the key."""
    raw = with_value(f"{SECTION}.{key}", value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as error:
        load_settings(tmp_path)
    assert message in str(error.value) and str(tmp_path / "params.yaml") in str(error.value)
    assert str(error.value).count(", got ") <= 1  # the bad value is quoted once
    assert parse_params(raw).orchestration[key] == value  # the ML library does not read it


def test_bad_action_button_is_named() -> None:
    raw = copy.deepcopy(DEFAULT)
    raw["environment"]["actions"][1]["buttons"] = ["FLY"]
    with pytest.raises(ParamsError, match=r"environment\.actions\[1\]\.buttons\[0\]: must be one of"):
        parse_params(raw)


def test_duplicate_action_names_rejected() -> None:
    raw = copy.deepcopy(DEFAULT)
    raw["environment"]["actions"].append({"name": "noop", "buttons": []})
    with pytest.raises(ParamsError, match="action names must be unique, repeated: \\['noop'\\]"):
        parse_params(raw)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("environment: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("profile", available_profiles())
def test_every_profile_validates(profile: str) -> None:
    params = parse_params(profile_params(profile, DEFAULT))
    assert params.profile == profile


def test_profiles_replace_the_ablation_scale_whole() -> None:
    """The default's small-scale ablation overrides must not leak into the micro or paper profile."""
    assert parse_params(DEFAULT).evaluation.ablations.overrides
    for profile in ("micro", "paper"):
        assert parse_params(profile_params(profile, DEFAULT)).evaluation.ablations.overrides == []


def test_paper_profile_is_paper_scale() -> None:
    params = parse_params(profile_params("paper", DEFAULT))
    assert params.environment.resolution == (320, 240)
    assert params.rl_agent.ppo.learning_rate == 1e-4
    assert params.rl_agent.ppo.n_envs == 8


def test_apply_profile_rewrites_params_and_refuses_unknown(tmp_path: Path) -> None:
    target = tmp_path / "params.yaml"
    target.write_text((REPO_ROOT / "params.yaml").read_text())
    params = apply_profile("micro", target)
    assert params.profile == "micro"
    assert load_params(target).environment.resolution == params.environment.resolution
    before = target.read_bytes()
    with pytest.raises(ParamsError, match="unknown profile 'huge'"):
        apply_profile("huge", target)
    assert target.read_bytes() == before
