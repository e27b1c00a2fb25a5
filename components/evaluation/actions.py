"""What each action means for measuring a world model, read from its name and buttons: its kind (turning,
moving, static), its opposite (the counterfactual of controllability) and the actions that press one button.

``actions`` are the ``environment.actions`` specs: objects with ``name`` and ``buttons``, or dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

ACTION_KINDS = ("turning", "moving", "static")


def action_kind(buttons: Sequence[str]) -> str:
    """``turning`` if the action turns the view, ``moving`` if it moves or strafes, else ``static``."""
    if any(b.startswith("TURN_") for b in buttons):
        return "turning"
    if any(b.startswith("MOVE_") for b in buttons):
        return "moving"
    return "static"


def action_loss_weights(actions: Sequence[Any], moving_weight: float,
                        device: torch.device | str = "cpu") -> torch.Tensor | None:
    """A training loss's weight per action id (a torch tensor on ``device``): ``moving_weight`` for the actions of
    kind ``moving``, 1 for the others; None when every weight would be 1 (the plain mean)."""
    if moving_weight == 1.0:
        return None
    return torch.tensor([moving_weight if action_kind(spec_field(a, "buttons")) == "moving" else 1.0
                         for a in actions], device=device)


# Tried in order, so a turn flips only its turn (forward_turn_left -> forward_turn_right), and an action
# that does not turn flips its direction (forward -> backward, strafe_left -> strafe_right).
_OPPOSITE_WORDS = ({"left": "right", "right": "left"}, {"forward": "backward", "backward": "forward"})
_OPPOSITE_BUTTONS = (
    {"TURN_LEFT": "TURN_RIGHT", "TURN_RIGHT": "TURN_LEFT"},
    {"MOVE_LEFT": "MOVE_RIGHT", "MOVE_RIGHT": "MOVE_LEFT"},
    {"MOVE_FORWARD": "MOVE_BACKWARD", "MOVE_BACKWARD": "MOVE_FORWARD"},
)


def counterfactual_actions(actions: Sequence[Any]) -> dict[int, int]:
    """Map each action id to its opposite: ``turn_left`` <-> ``turn_right``, ``forward`` <-> ``backward``...

    ``actions`` are the ``environment.actions`` specs (objects with ``name`` and ``buttons``, or dicts).
    The opposite is found by name first (swap the left/right words, else the forward/backward words, so
    ``forward_turn_left`` -> ``forward_turn_right``), then by buttons the same way. Actions with no
    opposite (no-op, attack, use) are left out: they have no counterfactual.
    """
    names = [spec_field(a, "name") for a in actions]
    buttons = [frozenset(spec_field(a, "buttons")) for a in actions]
    by_name = {n: i for i, n in enumerate(names)}
    by_buttons = {b: i for i, b in enumerate(buttons)}
    opposite: dict[int, int] = {}
    for i, name in enumerate(names):
        candidates = ["_".join(swap.get(w, w) for w in name.split("_")) for swap in _OPPOSITE_WORDS]
        found = [by_name[c] for c in candidates if c != name and c in by_name]
        if not found:
            flipped = [frozenset(swap.get(b, b) for b in buttons[i]) for swap in _OPPOSITE_BUTTONS]
            found = [by_buttons[f] for f in flipped if f != buttons[i] and f in by_buttons]
        if found:
            opposite[i] = found[0]
    return opposite


def spec_field(spec: Any, key: str) -> Any:
    """``key`` of an action spec, an object or a dict."""
    return spec[key] if isinstance(spec, dict) else getattr(spec, key)


def action_kinds(actions: Sequence[Any]) -> list[str]:
    """The kind (turning / moving / static) of every action id."""
    return [action_kind(spec_field(a, "buttons")) for a in actions]


def single_button_actions(actions: Sequence[Any], buttons: Sequence[str]) -> dict[str, int]:
    """``{button: action id}`` for each of ``buttons`` that some action presses alone (e.g. ``TURN_LEFT`` ->
    ``turn_left``), plus ``"NOOP"`` for the action that presses nothing, when the action set has one."""
    found: dict[str, int] = {}
    for index, spec in enumerate(actions):
        pressed = list(spec_field(spec, "buttons"))
        if not pressed:
            found.setdefault("NOOP", index)
        elif len(pressed) == 1 and pressed[0] in buttons:
            found.setdefault(pressed[0], index)
    return found
