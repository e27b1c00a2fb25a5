"""The ViZDoom game as a Gymnasium environment, configured from ``params.environment``.

* Scenario: ``freedoom1`` / ``freedoom2`` (full IWAD levels with the HUD; the default is Freedoom2 MAP01,
  the free stand-in for the paper's E1M1), any bundled ViZDoom scenario by name (``basic``, ``deathmatch``,
  ...), or a path to a user's own ``.cfg`` (plus optionally ``wad``: a path to a user's ``.wad``).
* Rendering is headless. The game renders at the smallest ViZDoom resolution with the same aspect ratio
  that is at least ``resolution``, and every frame is box-filtered down to exactly ``(width, height)``.
  Observations are ``uint8 [height, width, 3]`` RGB.
* Actions are ``Discrete(len(params.actions))``: action id ``i`` holds the buttons of ``params.actions[i]``
  for ``frame_skip`` tics. The game's available buttons are the union of all actions' buttons.
* With probability ``repeat_action_probability`` the previous action is executed instead of the chosen
  one (the paper makes repeating more likely); ``info["action"]`` is the action actually executed.
* The reward is the paper's reward (``components.game.reward``) times ``reward.scale``; ``info["reward_terms"]``
  holds the unscaled per-term breakdown of the step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import vizdoom as vzd
from PIL import Image

from components.errors import PipelineError
from components.game.reward import GameVariables, RewardFunction
from components.params import ActionSpec, EnvironmentParams, RewardParams

log = logging.getLogger(__name__)

IWAD_SCENARIOS = ("freedoom1", "freedoom2")

# Game variables the reward reads, in this order (see ``read_game_variables``). Ammo counts the four
# distinct ammo types once each: slots 2 and 4 both report bullets, slots 6 and 7 both report cells.
_V = vzd.GameVariable
GAME_VARIABLES: tuple[vzd.GameVariable, ...] = (
    _V.HITS_TAKEN,
    _V.DEAD,
    _V.HITCOUNT,
    _V.KILLCOUNT,
    _V.ITEMCOUNT,
    _V.SECRETCOUNT,
    _V.POSITION_X,
    _V.POSITION_Y,
    _V.HEALTH,
    _V.ARMOR,
    _V.AMMO2,  # bullets
    _V.AMMO3,  # shells
    _V.AMMO5,  # rockets
    _V.AMMO6,  # cells
)


# --------------------------------------------------------------------------- action set


def action_names(actions: list[ActionSpec]) -> list[str]:
    """Action id -> name, as recorded in shard attributes and used by the world model and player."""
    return [a.name for a in actions]


def action_buttons(actions: list[ActionSpec]) -> list[str]:
    """The union of all actions' buttons, in first-use order: the game's available buttons."""
    buttons: list[str] = []
    for action in actions:
        for button in action.buttons:
            if button not in buttons:
                buttons.append(button)
    return buttons


def action_matrix(actions: list[ActionSpec]) -> np.ndarray:
    """``[n_actions, n_buttons]`` 0/1 matrix: row ``i`` is the button vector of action ``i``."""
    buttons = action_buttons(actions)
    matrix = np.zeros((len(actions), len(buttons)), dtype=np.int64)
    for i, action in enumerate(actions):
        for button in action.buttons:
            matrix[i, buttons.index(button)] = 1
    return matrix


# --------------------------------------------------------------------------- resolution


def _resolutions() -> list[tuple[int, int, vzd.ScreenResolution]]:
    modes = []
    for name in dir(vzd.ScreenResolution):
        if name.startswith("RES_"):
            width, height = (int(v) for v in name[4:].split("X"))
            modes.append((width, height, getattr(vzd.ScreenResolution, name)))
    return sorted(modes, key=lambda m: (m[0] * m[1], m[0]))


def render_resolution(width: int, height: int) -> tuple[int, int, vzd.ScreenResolution]:
    """The smallest ViZDoom mode with the aspect ratio of ``width x height`` that is at least that size.

    If no mode has that aspect ratio, the smallest mode at least that size (the frame is then stretched).
    """
    modes = [m for m in _resolutions() if m[0] >= width and m[1] >= height]
    if not modes:
        raise PipelineError(f"environment.resolution: {width}x{height} is larger than every ViZDoom screen mode")
    same_aspect = [m for m in modes if m[0] * height == m[1] * width]
    if same_aspect:
        return same_aspect[0]
    log.warning("no ViZDoom mode has the aspect ratio of %dx%d; frames are stretched from %dx%d",
                width, height, modes[0][0], modes[0][1])
    return modes[0]


def downscale(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Box-filter an RGB ``uint8 [H, W, 3]`` frame to ``[height, width, 3]`` (a copy, always writable)."""
    source_h, source_w = frame.shape[:2]
    if source_h == height and source_w == width:
        return np.array(frame)
    image = Image.fromarray(frame)
    factor = source_w // width
    if source_w == width * factor and source_h == height * factor:
        return np.array(image.reduce(factor))  # integer factor: box mean, about 3x faster than resize
    return np.array(image.resize((width, height), Image.Resampling.BOX))


# --------------------------------------------------------------------------- game construction


@dataclass(frozen=True)
class ScenarioInfo:
    """What the game plays, as recorded in shard attributes and episode metadata."""

    scenario: str
    config: str
    wad: str | None
    map: str


def resolve_scenario(params: EnvironmentParams) -> ScenarioInfo:
    """Find the .cfg (and optional .wad) for ``params``; a missing file raises ``PipelineError``."""
    scenario = params.scenario
    bundled = Path(vzd.scenarios_path)
    looks_like_path = scenario.endswith(".cfg") or os.sep in scenario or "/" in scenario
    if looks_like_path:
        config = Path(scenario).expanduser()
        if not config.is_file():
            raise PipelineError(
                f"environment.scenario: config file {config} does not exist; give a path to a ViZDoom .cfg, "
                f"'freedoom1', 'freedoom2' or a bundled scenario name ({', '.join(bundled_scenarios())})"
            )
    else:
        config = bundled / f"{scenario}.cfg"
        if not config.is_file():
            raise PipelineError(
                f"environment.scenario: unknown scenario {scenario!r}; choose 'freedoom1', 'freedoom2', a bundled "
                f"scenario ({', '.join(bundled_scenarios())}) or a path to your own .cfg"
            )
    wad = None
    if params.wad is not None:
        wad_path = Path(params.wad).expanduser()
        if not wad_path.is_file():
            raise PipelineError(f"environment.wad: {wad_path} does not exist; give a path to a .wad file or null")
        wad = str(wad_path.resolve())
    if scenario == "freedoom1" and not params.map.upper().startswith("E"):
        raise PipelineError(f"environment.map: freedoom1 has maps E1M1..E4M9, got {params.map!r}")
    if scenario == "freedoom2" and not params.map.upper().startswith("MAP"):
        raise PipelineError(f"environment.map: freedoom2 has maps MAP01..MAP32, got {params.map!r}")
    return ScenarioInfo(scenario=scenario, config=str(config.resolve()), wad=wad, map=params.map.upper())


def bundled_scenarios() -> list[str]:
    return sorted(p.stem for p in Path(vzd.scenarios_path).glob("*.cfg") if p.stem not in ("doom", "doom2"))


def make_game(params: EnvironmentParams, render: bool = True) -> tuple[vzd.DoomGame, tuple[int, int]]:
    """Build and start a headless ``DoomGame`` for ``params``. Returns it and its render size (w, h)."""
    info = resolve_scenario(params)
    game = vzd.DoomGame()
    try:
        game.load_config(info.config)
    except Exception as error:  # ViZDoom raises its own exception types
        raise PipelineError(f"environment.scenario: ViZDoom cannot read {info.config}: {error}") from None
    if info.wad is not None:
        game.set_doom_scenario_path(info.wad)
    game.set_doom_map(info.map)
    render_w, render_h, mode = render_resolution(params.width, params.height)
    game.set_screen_resolution(mode)
    game.set_screen_format(vzd.ScreenFormat.RGB24)
    game.set_window_visible(False)
    game.set_sound_enabled(False)
    game.set_audio_buffer_enabled(False)
    game.set_automap_buffer_enabled(False)
    game.set_depth_buffer_enabled(False)
    game.set_labels_buffer_enabled(False)
    game.set_render_all_frames(False)
    game.set_episode_timeout(params.episode_timeout)
    game.set_mode(vzd.Mode.PLAYER)
    game.set_available_buttons([getattr(vzd.Button, b) for b in action_buttons(params.actions)])
    game.set_available_game_variables(list(GAME_VARIABLES))
    try:
        game.init()
    except Exception as error:
        raise PipelineError(
            f"environment: ViZDoom failed to start {info.config} (map {info.map}, wad {info.wad}): {error}"
        ) from None
    return game, (render_w, render_h)


def read_game_variables(game: vzd.DoomGame, state: Any | None = None) -> GameVariables:
    """The reward's game variables, from a state (fast) or from the game (works after the episode ended)."""
    values = state.game_variables if state is not None else [game.get_game_variable(v) for v in GAME_VARIABLES]
    hits_taken, dead, hits, kills, items, secrets, x, y, health, armor, *ammo = (float(v) for v in values)
    return GameVariables(
        hits_taken=hits_taken,
        dead=dead,
        hit_count=hits,
        kill_count=kills,
        item_count=items,
        secret_count=secrets,
        position_x=x,
        position_y=y,
        health=health,
        armor=armor,
        ammo=sum(ammo),
    )


# --------------------------------------------------------------------------- gymnasium environment


class DoomEnv(gym.Env):
    """One ViZDoom game. See the module docstring for what it observes, does and rewards."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, params: EnvironmentParams, reward: RewardParams | None = None) -> None:
        super().__init__()
        self.params = params
        self.scenario = resolve_scenario(params)
        self.game, self.render_size = make_game(params)
        self.width, self.height = params.width, params.height
        self._buttons = [list(map(int, row)) for row in action_matrix(params.actions)]
        self.action_space = gym.spaces.Discrete(len(params.actions))
        self.observation_space = gym.spaces.Box(0, 255, (self.height, self.width, 3), dtype=np.uint8)
        self.reward_function = RewardFunction(reward or RewardParams())
        self._previous_action = 0
        self._observation = np.zeros(self.observation_space.shape, dtype=np.uint8)
        self._rng = np.random.default_rng()

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            self.game.set_seed(int(seed) % (2**31))
        else:
            self.game.set_seed(int(self.np_random.integers(2**31)))
        self.game.new_episode()
        state = self.game.get_state()
        self.reward_function.reset(read_game_variables(self.game, state))
        self._previous_action = 0
        self._observation = downscale(state.screen_buffer, self.width, self.height)
        return self._observation, {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action = int(action)
        p = self.params.repeat_action_probability
        if p > 0.0 and self._rng.random() < p:
            action = self._previous_action
        self._previous_action = action
        self.game.make_action(self._buttons[action], self.params.frame_skip)
        finished = self.game.is_episode_finished()
        state = None if finished else self.game.get_state()
        variables = read_game_variables(self.game, state)
        terms = self.reward_function.step(variables)
        if state is not None:
            self._observation = downscale(state.screen_buffer, self.width, self.height)
        terminated = finished and (variables.dead > 0 or not self._timed_out())
        truncated = finished and not terminated
        reward = float(sum(terms.values())) * self.reward_function.params.scale
        return self._observation, reward, terminated, truncated, {"action": action, "reward_terms": terms}

    def _timed_out(self) -> bool:
        return self.game.get_episode_time() >= self.params.episode_timeout

    def render(self) -> np.ndarray:
        return self._observation

    def close(self) -> None:
        self.game.close()
