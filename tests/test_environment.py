"""The Gymnasium environment over real ViZDoom: action set, observations, frame skip, repeats, errors."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import vizdoom as vzd

from components.errors import PipelineError
from components.game.environment import (
    DoomEnv,
    action_buttons,
    action_matrix,
    action_names,
    downscale,
    render_resolution,
)
from components.game.reward import TERMS
from components.params import EnvironmentParams, load_params
from tests.fixtures.processes import REPO_ROOT

DEFAULT = load_params(REPO_ROOT / "params.yaml")


def env_params(**changes: object) -> EnvironmentParams:
    base = DEFAULT.environment.model_dump()
    base.update({"resolution": (32, 24), "episode_timeout": 400}, **changes)
    return EnvironmentParams.model_validate(base)


@pytest.fixture(scope="module")
def env() -> Iterator[DoomEnv]:
    game = DoomEnv(env_params(), DEFAULT.reward)
    yield game
    game.close()


def test_action_set_is_the_params_list() -> None:
    actions = DEFAULT.environment.actions
    names = action_names(actions)
    assert names[0] == "noop" and len(names) == len(actions)
    buttons = action_buttons(actions)
    assert len(buttons) == len(set(buttons))
    assert set(buttons) == {b for a in actions for b in a.buttons}
    matrix = action_matrix(actions)
    assert matrix.shape == (len(actions), len(buttons))
    assert matrix[0].sum() == 0  # noop presses nothing
    forward_left = names.index("forward_turn_left")
    pressed = {buttons[j] for j in np.flatnonzero(matrix[forward_left])}
    assert pressed == {"MOVE_FORWARD", "TURN_LEFT"}


def test_game_buttons_are_the_union(env: DoomEnv) -> None:
    available = [b.name for b in env.game.get_available_buttons()]
    assert available == action_buttons(DEFAULT.environment.actions)
    assert env.action_space.n == len(DEFAULT.environment.actions)


def test_observation_shape_and_dtype(env: DoomEnv) -> None:
    observation, _ = env.reset(seed=1)
    assert observation.shape == (24, 32, 3) and observation.dtype == np.uint8
    assert env.observation_space.contains(observation)
    assert observation.std() > 0  # a real picture, not a blank
    observation, reward, terminated, truncated, info = env.step(1)
    assert observation.shape == (24, 32, 3) and observation.dtype == np.uint8
    assert set(info["reward_terms"]) == set(TERMS)
    assert reward == pytest.approx(sum(info["reward_terms"].values()) * DEFAULT.reward.scale)
    assert not terminated and not truncated


@pytest.mark.parametrize(
    ("size", "mode"),
    [((32, 24), (160, 120)), ((80, 60), (160, 120)), ((160, 120), (160, 120)), ((200, 150), (200, 150)),
     ((320, 240), (320, 240)), ((128, 72), (256, 144)), ((256, 160), (256, 160))],
)
def test_render_resolution_is_smallest_same_aspect_mode(size: tuple[int, int], mode: tuple[int, int]) -> None:
    assert render_resolution(*size)[:2] == mode


def test_downscale_is_a_box_mean() -> None:
    frame = np.zeros((120, 160, 3), dtype=np.uint8)
    frame[:2, :2] = [40, 80, 120]
    small = downscale(frame, 80, 60)
    assert small.shape == (60, 80, 3) and small.flags.writeable
    assert small[0, 0].tolist() == [40, 80, 120] and small[1, 1].tolist() == [0, 0, 0]
    assert downscale(frame, 32, 24).shape == (24, 32, 3)


def test_frame_skip_advances_the_game(env: DoomEnv) -> None:
    env.reset(seed=2)
    before = env.game.get_episode_time()
    for _ in range(3):
        env.step(0)
    assert env.game.get_episode_time() - before == 3 * DEFAULT.environment.frame_skip


def test_same_seed_same_episode(env: DoomEnv) -> None:
    def play() -> list[np.ndarray]:
        frames = [env.reset(seed=7)[0]]
        frames += [env.step(a)[0] for a in (1, 1, 3, 1, 9, 6)]
        return frames

    first, second = play(), play()
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], first[-1])  # the actions moved the view


def test_repeat_action_probability() -> None:
    def repeated_share(probability: float) -> float:
        game = DoomEnv(env_params(repeat_action_probability=probability, episode_timeout=100_000))
        try:
            game.reset(seed=3)
            chosen = np.random.default_rng(0).integers(game.action_space.n, size=300)
            executed = []
            for action in chosen:
                executed.append(game.step(int(action))[4]["action"])
        finally:
            game.close()
        return float(np.mean(np.asarray(executed) != chosen))

    assert repeated_share(0.0) == 0.0
    share = repeated_share(0.8)
    # with p = 0.8 the chosen action is overridden unless it equals the repeated one (1/11 chance)
    assert 0.6 < share < 0.85


def test_bundled_scenario_by_name() -> None:
    game = DoomEnv(env_params(scenario="basic", map="MAP01"))
    try:
        observation, _ = game.reset(seed=0)
        assert observation.shape == (24, 32, 3)
        assert [b.name for b in game.game.get_available_buttons()] == action_buttons(DEFAULT.environment.actions)
    finally:
        game.close()


def test_user_cfg_path(tmp_path: Path) -> None:
    shutil.copy(Path(vzd.scenarios_path) / "basic.wad", tmp_path / "mine.wad")
    config = tmp_path / "mine.cfg"
    config.write_text("doom_scenario_path = mine.wad\ndoom_map = map01\n")  # relative to the .cfg
    game = DoomEnv(env_params(scenario=str(config), map="MAP01"))
    try:
        assert game.reset(seed=0)[0].shape == (24, 32, 3)
    finally:
        game.close()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"scenario": "/no/such/level.cfg"}, "environment.scenario: config file /no/such/level.cfg does not exist"),
        ({"scenario": "no_such_scenario"}, "environment.scenario: unknown scenario 'no_such_scenario'"),
        ({"wad": "/no/such/file.wad"}, "environment.wad: /no/such/file.wad does not exist"),
        ({"map": "E1M1"}, "environment.map: freedoom2 has maps MAP01..MAP32"),
    ],
)
def test_bad_scenario_is_a_clear_error(changes: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=message.replace(".", r"\.")):
        DoomEnv(env_params(**changes))
