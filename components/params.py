"""Typed, validated access to ``params.yaml``: the one place every stage reads its settings from.

Each top-level section of ``params.yaml`` is one pipeline stage (or a shared part such as ``environment``).
Unknown keys, wrong types and out-of-range values fail on load with ``ParamsError``, whose message names
the key path and what is allowed, e.g. ``rl_agent.ppo.n_steps: must be > 0, got -5``.

Profiles (``profiles/<name>.yaml``: ``micro`` for tests, ``paper`` for paper scale) are partial overrides
merged into ``params.yaml`` by ``gamengen profile <name>``; see ``apply_profile``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from components.errors import PipelineError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_PARAMS_PATH = Path("params.yaml")
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"

# ViZDoom buttons an action may press. Names match ``vizdoom.Button`` members.
Button = Literal[
    "MOVE_FORWARD",
    "MOVE_BACKWARD",
    "TURN_LEFT",
    "TURN_RIGHT",
    "MOVE_LEFT",
    "MOVE_RIGHT",
    "ATTACK",
    "USE",
    "SPEED",
    "JUMP",
    "CROUCH",
    "SELECT_NEXT_WEAPON",
    "SELECT_PREV_WEAPON",
]


class ParamsError(PipelineError, ValueError):
    """A params file that cannot be used. The message lists every bad key path and what is allowed."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable after load."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- environment and reward


class ActionSpec(Section):
    name: str = Field(min_length=1)
    buttons: list[Button] = Field(default_factory=list, description="buttons held; empty means no-op")


class EnvironmentParams(Section):
    """The ViZDoom game every stage plays or learns. See README "Environment"."""

    scenario: str = Field(
        "freedoom2",
        description="'freedoom1' / 'freedoom2' (full IWAD levels with HUD), a bundled scenario name such as "
        "'basic' or 'deathmatch', or a path to a user's .cfg file",
    )
    wad: str | None = Field(None, description="optional path to a user's .wad (overrides the scenario's wad)")
    map: str = Field("MAP01", description="map lump name, e.g. MAP01 or E1M1")
    resolution: tuple[int, int] = Field((80, 60), description="recorded frame size as (width, height)")
    frame_skip: int = Field(4, gt=0, description="game tics each action is held for (paper: 4)")
    episode_timeout: int = Field(2100, gt=0, description="episode length limit in game tics (35 tics = 1 s)")
    repeat_action_probability: float = Field(
        0.0, ge=0.0, lt=1.0, description="chance of repeating the previous action instead of the chosen one"
    )
    actions: list[ActionSpec] = Field(min_length=2)

    @field_validator("resolution")
    @classmethod
    def _resolution_positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 16 or max(value) > 1920:
            raise ValueError(f"must be (width, height) with each side in [16, 1920], got {list(value)}")
        return value

    @field_validator("actions")
    @classmethod
    def _unique_action_names(cls, value: list[ActionSpec]) -> list[ActionSpec]:
        names = [a.name for a in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"action names must be unique, repeated: {duplicates}")
        return value

    @property
    def width(self) -> int:
        return self.resolution[0]

    @property
    def height(self) -> int:
        return self.resolution[1]


class RewardParams(Section):
    """Weights of the paper's reward terms (GameNGen, appendix), and the exploration grid."""

    player_hit: float = -100.0
    player_death: float = -5000.0
    enemy_hit: float = 300.0
    enemy_kill: float = 1000.0
    item_pickup: float = 100.0
    secret_found: float = 500.0
    new_area: float = 20.0
    new_area_distance_bonus: float = Field(0.5, ge=0.0, description="new area: new_area * (1 + bonus * L1 cells)")
    health_delta: float = 10.0
    armor_delta: float = 10.0
    ammo_gain: float = 10.0
    ammo_loss: float = 1.0
    grid_cell_size: float = Field(64.0, gt=0.0, description="side of a visited-area cell in map units")
    scale: float = Field(0.01, gt=0.0, description="multiplies the summed reward before PPO sees it")


# --------------------------------------------------------------------------- stage 1: rl_agent


class PPOParams(Section):
    """Stable-Baselines3 PPO settings. Paper values in comments."""

    learning_rate: float = Field(3e-4, gt=0.0)  # paper: 1e-4
    n_steps: int = Field(256, gt=0)  # paper: 512 (rollout buffer)
    batch_size: int = Field(64, gt=0)  # paper: 64
    n_epochs: int = Field(4, gt=0)  # paper: 10
    gamma: float = Field(0.99, gt=0.0, le=1.0)  # paper: 0.99
    gae_lambda: float = Field(0.95, gt=0.0, le=1.0)
    ent_coef: float = Field(0.01, ge=0.0)  # paper: 0.1
    clip_range: float = Field(0.2, gt=0.0)
    n_envs: int = Field(2, gt=0)  # paper: 8 parallel games
    features_dim: int = Field(256, gt=0)  # paper: 512


class RLAgentParams(Section):
    total_timesteps: int = Field(20_000, gt=0)  # paper: 50M
    checkpoints: int = Field(4, gt=0, description="policy snapshots saved evenly over training")
    seed: int = 0
    ppo: PPOParams = PPOParams()


# --------------------------------------------------------------------------- stage 2: raw_trajectories


class RawTrajectoriesParams(Section):
    shards: list[int] = Field(min_length=1, description="shard ids; each is an independent DVC stage")
    frames_per_shard: int = Field(20_000, gt=0)
    parallel_games: int = Field(8, gt=0, description="games stepped in lockstep so the policy runs batched")
    policy: Literal["agent", "random"] = Field("agent", description="'random' makes the random-play ablation set")
    random_action_fraction: float = Field(0.2, ge=0.0, le=1.0, description="share of actions drawn at random")
    heldout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of episodes kept for evaluation")
    seed: int = 0

    @field_validator("shards")
    @classmethod
    def _unique_shards(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or min(value) < 0:
            raise ValueError(f"must be distinct non-negative ids, got {value}")
        return value


# --------------------------------------------------------------------------- later stages
# Each later issue fills in its own section class below; keep one class per stage.


class AutoencoderParams(Section):
    """Base autoencoder (helper stage ``base_autoencoder``). Filled in by the latents issue."""


class ValidatedLatentsParams(Section):
    """Stage ``validated_latents``. Filled in by the latents issue."""


class FinetunedVaeParams(Section):
    """Stage ``finetuned_vae``. Filled in by the latents issue."""


class WorldModelParams(Section):
    """Model shape and conditioning of the diffusion world model. Filled in by the world-model issue."""


class DiffusionCheckpointParams(Section):
    """Stage ``diffusion_checkpoint`` (training). Filled in by the world-model issue."""


class SamplerParams(Section):
    """Inference-time sampling. Filled in by the world-model issue."""


class DistilledModelParams(Section):
    """Stage ``distilled_model``. Filled in by the distillation issue."""


class OnnxExportParams(Section):
    """Stage ``onnx_export``. Filled in by the distillation issue."""


class PlayParams(Section):
    """The real-time browser player. Filled in by the distillation issue."""


class EvaluationParams(Section):
    """Stage ``evaluation``. Filled in by the evaluation issue."""


class OrchestrationParams(Section):
    """Dagster schedules and DVC remote use. Filled in by the orchestration issue."""


class Params(Section):
    """The whole of ``params.yaml``."""

    profile: str = Field("default", description="name of the profile these params came from")
    environment: EnvironmentParams
    reward: RewardParams = RewardParams()
    rl_agent: RLAgentParams = RLAgentParams()
    raw_trajectories: RawTrajectoriesParams
    autoencoder: AutoencoderParams = AutoencoderParams()
    validated_latents: ValidatedLatentsParams = ValidatedLatentsParams()
    finetuned_vae: FinetunedVaeParams = FinetunedVaeParams()
    world_model: WorldModelParams = WorldModelParams()
    diffusion_checkpoint: DiffusionCheckpointParams = DiffusionCheckpointParams()
    sampler: SamplerParams = SamplerParams()
    distilled_model: DistilledModelParams = DistilledModelParams()
    onnx_export: OnnxExportParams = OnnxExportParams()
    play: PlayParams = PlayParams()
    evaluation: EvaluationParams = EvaluationParams()
    orchestration: OrchestrationParams = OrchestrationParams()


# --------------------------------------------------------------------------- loading

_CONSTRAINT_TEXT = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_short": "must have at least {min_length} character(s)",
    "extra_forbidden": "unknown key (check the spelling; allowed keys are listed in components/params.py)",
    "missing": "is required",
    "literal_error": "must be one of {expected}",
}


def _key_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _describe(error: Any) -> str:
    template = _CONSTRAINT_TEXT.get(error["type"])
    context = error.get("ctx") or {}
    if template:
        try:
            text = template.format(**context)
        except (KeyError, IndexError):
            text = error["msg"]
    else:
        text = error["msg"].removeprefix("Value error, ")
    if error["type"] not in ("missing", "extra_forbidden") and "input" in error:
        text += f", got {error['input']!r}"
    return f"{_key_path(error['loc'])}: {text}"


def format_validation_error(error: ValidationError) -> str:
    return "\n".join(_describe(e) for e in error.errors())


def parse_params(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a params mapping, raising ``ParamsError`` that names every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: must be a mapping of stage sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ParamsError(f"invalid {source}:\n{format_validation_error(error)}") from None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root, or pass --params)") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from None
    return data if data is not None else {}


def load_params(path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Load and validate ``params.yaml``. Every stage reads its section through this function."""
    return parse_params(read_yaml(Path(path)), source=str(path))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_params(profile: str, base: dict[str, Any]) -> dict[str, Any]:
    """Merge ``profiles/<profile>.yaml`` onto ``base``."""
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown profile {profile!r}: choose one of {available_profiles()}")
    merged = deep_merge(base, read_yaml(path))
    merged["profile"] = profile
    return merged


def apply_profile(profile: str, params_path: str | Path = DEFAULT_PARAMS_PATH) -> Params:
    """Merge a profile's overrides into ``params_path`` in place, validating before anything is written.

    ``params.yaml`` as committed is the default profile; ``git checkout params.yaml`` returns to it.
    """
    from components.atomic import atomic_write_text

    merged = profile_params(profile, read_yaml(Path(params_path)))
    params = parse_params(merged, source=f"{params_path} + profile {profile!r}")
    atomic_write_text(Path(params_path), yaml.safe_dump(merged, sort_keys=False))
    return params
