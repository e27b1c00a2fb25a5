"""The paper's reward (GameNGen appendix), computed from ViZDoom game variables. Pure: no ViZDoom import.

Per step, from the change of each game variable since the previous step (weights in ``params.reward``):

=================  =========================================================================
term               reward
=================  =========================================================================
player_hit         ``player_hit`` per hit taken (HITS_TAKEN increase)
player_death       ``player_death`` when the player dies (DEAD goes 0 -> 1)
enemy_hit          ``enemy_hit`` per hit on an enemy (HITCOUNT increase)
enemy_kill         ``enemy_kill`` per kill (KILLCOUNT increase)
item_pickup        ``item_pickup`` per item or weapon picked up (ITEMCOUNT increase)
secret_found       ``secret_found`` per secret found (SECRETCOUNT increase)
new_area           ``new_area * (1 + new_area_distance_bonus * d)`` per newly visited grid cell, where
                   cells are ``grid_cell_size`` map units square over (POSITION_X, POSITION_Y) and
                   ``d`` is the L1 distance in cells from the episode's start cell (visited at reset)
health             ``health_delta * delta(HEALTH)``
armor              ``armor_delta * delta(ARMOR)``
ammo               ``ammo_gain * max(0, delta) + ammo_loss * min(0, delta)`` of the total ammo
=================  =========================================================================

The environment feeds PPO ``scale * sum(terms)``; the terms themselves are unscaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from components.params import RewardParams

TERMS = (
    "player_hit",
    "player_death",
    "enemy_hit",
    "enemy_kill",
    "item_pickup",
    "secret_found",
    "new_area",
    "health",
    "armor",
    "ammo",
)


@dataclass(frozen=True)
class GameVariables:
    """The game variables the reward reads, at one step. Counters are cumulative over the episode."""

    hits_taken: float = 0.0
    dead: float = 0.0
    hit_count: float = 0.0
    kill_count: float = 0.0
    item_count: float = 0.0
    secret_count: float = 0.0
    position_x: float = 0.0
    position_y: float = 0.0
    health: float = 100.0
    armor: float = 0.0
    ammo: float = 0.0


def grid_cell(variables: GameVariables, cell_size: float) -> tuple[int, int]:
    """The exploration-grid cell that holds the player's position."""
    return math.floor(variables.position_x / cell_size), math.floor(variables.position_y / cell_size)


class RewardFunction:
    """Stateful per-episode reward: call ``reset`` with the first step's variables, then ``step`` each step."""

    def __init__(self, params: RewardParams) -> None:
        self.params = params
        self._previous: GameVariables | None = None
        self._start: tuple[int, int] = (0, 0)
        self.visited: set[tuple[int, int]] = set()

    def reset(self, variables: GameVariables) -> None:
        self._previous = variables
        self._start = grid_cell(variables, self.params.grid_cell_size)
        self.visited = {self._start}

    def step(self, variables: GameVariables) -> dict[str, float]:
        """The reward terms earned between the previous call (or ``reset``) and ``variables``."""
        if self._previous is None:
            raise RuntimeError("RewardFunction.step called before reset")
        p, before, now = self.params, self._previous, variables
        ammo = now.ammo - before.ammo
        terms = {
            "player_hit": p.player_hit * max(0.0, now.hits_taken - before.hits_taken),
            "player_death": p.player_death * float(now.dead > 0 and before.dead <= 0),
            "enemy_hit": p.enemy_hit * max(0.0, now.hit_count - before.hit_count),
            "enemy_kill": p.enemy_kill * max(0.0, now.kill_count - before.kill_count),
            "item_pickup": p.item_pickup * max(0.0, now.item_count - before.item_count),
            "secret_found": p.secret_found * max(0.0, now.secret_count - before.secret_count),
            "new_area": self._explore(now),
            "health": p.health_delta * (now.health - before.health),
            "armor": p.armor_delta * (now.armor - before.armor),
            "ammo": p.ammo_gain * max(0.0, ammo) + p.ammo_loss * min(0.0, ammo),
        }
        self._previous = now
        return terms

    def _explore(self, variables: GameVariables) -> float:
        cell = grid_cell(variables, self.params.grid_cell_size)
        if cell in self.visited:
            return 0.0
        self.visited.add(cell)
        distance = abs(cell[0] - self._start[0]) + abs(cell[1] - self._start[1])
        return self.params.new_area * (1.0 + self.params.new_area_distance_bonus * distance)


def total(terms: dict[str, float]) -> float:
    """Sum of the (unscaled) reward terms."""
    return float(sum(terms.values()))
