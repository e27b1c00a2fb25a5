"""The paper's reward, term by term, on synthetic game-variable sequences (no ViZDoom needed)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from components.game.reward import TERMS, GameVariables, RewardFunction, grid_cell, total
from components.params import RewardParams

PARAMS = RewardParams()  # the paper's weights
START = GameVariables(health=100.0, armor=0.0, ammo=50.0, position_x=10.0, position_y=10.0)


def run(*steps: GameVariables, params: RewardParams = PARAMS, start: GameVariables = START) -> list[dict]:
    reward = RewardFunction(params)
    reward.reset(start)
    return [reward.step(s) for s in steps]


def only(terms: dict[str, float], name: str) -> float:
    """The value of ``name``, asserting every other term is zero."""
    others = {k: v for k, v in terms.items() if k != name and v != 0.0}
    assert not others, f"unexpected terms {others}"
    return terms[name]


def test_every_term_is_reported() -> None:
    (terms,) = run(START)
    assert set(terms) == set(TERMS)
    assert total(terms) == 0.0


@pytest.mark.parametrize(
    ("field", "term", "per_unit"),
    [
        ("hits_taken", "player_hit", -100.0),
        ("hit_count", "enemy_hit", 300.0),
        ("kill_count", "enemy_kill", 1000.0),
        ("item_count", "item_pickup", 100.0),
        ("secret_count", "secret_found", 500.0),
    ],
)
def test_counter_terms(field: str, term: str, per_unit: float) -> None:
    one = replace(START, **{field: 1.0})
    three = replace(START, **{field: 3.0})
    first, second, third = run(one, three, three)
    assert only(first, term) == per_unit
    assert only(second, term) == 2 * per_unit  # two events within one step both count
    assert only(third, term) == 0.0  # no change, no reward


def test_player_death_counts_once() -> None:
    dead = replace(START, dead=1.0)
    first, second = run(dead, dead)
    assert only(first, "player_death") == -5000.0
    assert second["player_death"] == 0.0


@pytest.mark.parametrize(("field", "term"), [("health", "health"), ("armor", "armor")])
def test_health_and_armor_deltas(field: str, term: str) -> None:
    start = replace(START, health=50.0, armor=50.0)
    up, down = run(replace(start, **{field: 75.0}), replace(start, **{field: 60.0}), start=start)
    assert only(up, term) == 10.0 * 25.0
    assert only(down, term) == 10.0 * -15.0


def test_ammo_gain_and_loss_are_weighted_differently() -> None:
    gained, spent = run(replace(START, ammo=60.0), replace(START, ammo=55.0))
    assert only(gained, "ammo") == 10.0 * 10  # 10 * max(0, +10)
    assert only(spent, "ammo") == -5.0  # min(0, -5)


def test_new_area_grows_with_l1_distance_from_start_cell() -> None:
    cell = PARAMS.grid_cell_size
    assert grid_cell(START, cell) == (0, 0)
    same_cell = replace(START, position_x=cell - 1)
    one_east = replace(START, position_x=cell + 1)
    diagonal = replace(START, position_x=cell * 2 + 1, position_y=-cell - 1)  # cell (2, -2): L1 = 4
    steps = run(same_cell, one_east, one_east, START, diagonal)
    assert only(steps[0], "new_area") == 0.0  # the start cell is visited at reset
    assert only(steps[1], "new_area") == 20.0 * (1 + 0.5 * 1)
    assert only(steps[2], "new_area") == 0.0  # already visited
    assert only(steps[3], "new_area") == 0.0  # back to the start cell
    assert only(steps[4], "new_area") == 20.0 * (1 + 0.5 * 4)


def test_new_area_grid_is_per_episode() -> None:
    reward = RewardFunction(PARAMS)
    far = replace(START, position_x=1000.0)
    reward.reset(START)
    assert reward.step(far)["new_area"] > 0
    reward.reset(START)  # a new episode forgets the visited cells
    assert reward.step(far)["new_area"] > 0


def test_weights_come_from_params() -> None:
    params = RewardParams(enemy_kill=7.0, ammo_gain=2.0, ammo_loss=3.0, new_area=1.0, new_area_distance_bonus=0.0)
    kill, gain, loss, move = run(
        replace(START, kill_count=1.0),
        replace(START, kill_count=1.0, ammo=51.0),
        replace(START, kill_count=1.0, ammo=49.0),
        replace(START, kill_count=1.0, ammo=49.0, position_y=10_000.0),
        params=params,
    )
    assert kill["enemy_kill"] == 7.0
    assert gain["ammo"] == 2.0
    assert loss["ammo"] == -6.0
    assert move["new_area"] == 1.0


def test_combined_step_sums_terms() -> None:
    hurt_and_kill = replace(START, hits_taken=1.0, health=90.0, kill_count=1.0, ammo=49.0)
    (terms,) = run(hurt_and_kill)
    assert total(terms) == pytest.approx(-100.0 - 100.0 + 1000.0 - 1.0)


def test_step_before_reset_fails() -> None:
    with pytest.raises(RuntimeError, match="before reset"):
        RewardFunction(PARAMS).step(START)
