"""The paper's ablations as DVC experiments, and the tables they make in ``docs/results.md``.

``python -m components ablations`` (also ``make ablations``) queues one DVC experiment per setting with
``dvc exp run --queue -n abl-<tag>-<label> -S key=value ...``, runs the queue (``dvc exp run --run-all``),
then reads ``dvc exp show --json`` and writes the tables. ``--report-only`` rewrites the tables from the
experiments already in the repo. The settings (``evaluation.ablations`` in params.yaml):

* context length K: ``world_model.context`` in ``context_lengths`` (paper: 1, 2, 4, 8, 16, 32, 64);
* noise augmentation on and off: on is the baseline, off applies ``noise_off`` (no context noise in
  training nor at inference);
* agent versus random-policy data: ``raw_trajectories.policy`` in ``data_policies``;
* the action warp on and off (not in the paper): off applies ``warp_off``;
* ``overrides`` are applied to every experiment (e.g. fewer training steps, for "a small scale");
* with several ``seeds``, every setting runs once per seed, and the tables show the spread.

Experiments that would be identical (K equal to the baseline's, noise on, the baseline's policy) are run once,
as ``base``. The tables select experiments by the params they actually ran with, not by their names, and use
the newest tag (one tag per invocation) unless ``--tag`` names another. DVC queues experiments from the last
git commit plus tracked changes: commit (or ``git add``) new files before running.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.atomic import atomic_write_text
from components.errors import PipelineError
from components.evaluation.promotion import metric_value
from components.params import parse_overrides

if TYPE_CHECKING:
    from components.params import AblationsParams


log = logging.getLogger(__name__)

PREFIX = "abl"
METRICS_FILE = "metrics/evaluation.json"
MICRO_CAVEAT = (
    "**Micro profile**: 32x24 frames, tens of training steps, a few held-out episodes. These tables show that the\n"
    "machinery runs end to end; their numbers say nothing about the method. Rerun at the default profile.\n\n"
)


class AblationError(PipelineError):
    """An ablation experiment failed or the experiments cannot be read."""


@dataclass(frozen=True)
class Experiment:
    """One DVC experiment: its label (``base``, ``context-2``, ``noise-off``, ``data-random``) and ``-S`` values."""

    label: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def name(self, tag: str) -> str:
        return f"{PREFIX}-{tag}-{self.label}"

    def set_params(self) -> list[str]:
        return [f"{key}={_yaml_scalar(value)}" for key, value in sorted(self.overrides.items())]


def _yaml_scalar(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


GROUPS = ("warp", "noise", "context", "data")
TARGET_STAGE = "evaluation"
SEED_MARK = "-seed"


def plan(ablations: AblationsParams, baseline: Mapping[str, Any], groups: Iterable[str] = GROUPS) -> list[Experiment]:
    """The experiments to run. ``ablations`` is ``params.evaluation.ablations``; ``baseline`` the params dict
    (to know the current K and policy, which the baseline experiment already covers). With several
    ``ablations.seeds``, every setting runs once per seed (``<label>-seed<N>``, each of ``seed_keys`` set to N)."""
    groups = set(groups)
    unknown = groups - set(GROUPS)
    if unknown:
        raise AblationError(f"unknown ablation groups {sorted(unknown)}; choose from {', '.join(GROUPS)}")
    common = parse_overrides(ablations.overrides)
    base_k = metric_value(baseline, ablations.context_key)
    base_policy = _lookup(baseline, ablations.data_key)
    settings = [("base", common)]  # warp and noise first: a queue cut short still has them
    if "warp" in groups:
        settings.append(("warp-off", {**common, **ablations.warp_off}))
    if "noise" in groups:
        settings.append(("noise-off", {**common, **ablations.noise_off}))
    if "context" in groups:
        settings += [(f"context-{k}", {**common, ablations.context_key: k})
                     for k in ablations.context_lengths if k != base_k]
    if "data" in groups:
        settings += [(f"data-{p}", {**common, ablations.data_key: p})
                     for p in ablations.data_policies if p != base_policy]
    if len(ablations.seeds) == 1:
        return [Experiment(label, overrides) for label, overrides in settings]
    return [Experiment(f"{label}{SEED_MARK}{seed}", {**overrides, **{key: seed for key in ablations.seed_keys}})
            for label, overrides in settings for seed in ablations.seeds]


def setting_of(label: str) -> str:
    """The setting an experiment label belongs to: ``context-2-seed1`` -> ``context-2``."""
    head, mark, seed = label.rpartition(SEED_MARK)
    return head if mark and seed.isdigit() else label


def _lookup(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# --------------------------------------------------------------------------- running


def _dvc(args: Sequence[str], cwd: Path, capture: bool = True) -> subprocess.CompletedProcess:
    command = ["dvc", *args]
    log.info("$ %s", " ".join(command))
    result = subprocess.run(command, cwd=cwd, text=True, capture_output=capture)
    if result.returncode != 0:
        output = f"{result.stdout or ''}{result.stderr or ''}"
        raise AblationError(f"`{' '.join(command)}` failed ({result.returncode}):\n{output}")
    return result


def queue_and_run(experiments: Sequence[Experiment], repo: Path, tag: str, jobs: int = 1) -> list[str]:
    """Queue every experiment, run the queue (blocking), and fail naming any experiment that failed."""
    names = []
    for experiment in experiments:
        name = experiment.name(tag)
        args = ["exp", "run", "--queue", "-n", name]
        for value in experiment.set_params():
            args += ["-S", value]
        args.append(TARGET_STAGE)  # what the tables read; the champion stage after it is not an ablation
        _dvc(args, repo)
        names.append(name)
    _dvc(["exp", "run", "--run-all", "-j", str(jobs)], repo, capture=False)
    status = _dvc(["queue", "status"], repo).stdout
    failed = [line.split()[1] for line in status.splitlines()
              if len(line.split()) > 1 and line.split()[1] in names and "Failed" in line]
    if failed:
        raise AblationError(f"ablation experiments failed: {failed}; see `dvc queue logs <name>` in {repo}")
    return names


# --------------------------------------------------------------------------- reading results


@dataclass
class Result:
    name: str
    label: str
    tag: str
    timestamp: str
    params: dict[str, Any]
    metrics: dict[str, Any]


def read_experiments(show: list[dict[str, Any]]) -> list[Result]:
    """Ablation experiments (names ``abl-<tag>-<label>``) from ``dvc exp show --json`` output."""
    results = []
    for baseline in show:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs") or []:
                name = rev.get("name") or group.get("name") or ""
                parts = name.split("-", 2)
                if len(parts) < 3 or parts[0] != PREFIX:
                    continue
                data = rev.get("data") or {}
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = (data.get("metrics") or {}).get(METRICS_FILE, {}).get("data")
                if metrics is None:
                    continue
                results.append(Result(name, parts[2], parts[1], data.get("timestamp") or "", params, metrics))
    return results


def dvc_exp_show(repo: Path) -> list[dict[str, Any]]:
    return json.loads(_dvc(["exp", "show", "--json", "--all-commits"], repo).stdout)


def latest_tag(results: Sequence[Result]) -> str | None:
    return max((r.tag for r in results), default=None)


# --------------------------------------------------------------------------- tables


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _stat(results: Sequence[Result], path: str, digits: int = 2) -> str:
    """The value of ``path`` over the seeds of one setting: ``mean`` alone, or ``mean ± half the range``."""
    values = [float(v) for v in (metric_value(r.metrics, path) for r in results) if isinstance(v, (int, float))]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return _num(mean, digits)
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))


def tables(results: Sequence[Result], ablations: AblationsParams, model: str = "onnx") -> str:
    """Markdown tables shaped like the paper's, from one tag's results; with several seeds per setting each cell
    is the mean ± half the spread between seeds.

    * context length against next-frame PSNR (three views), the teacher's pooled PSNR, and LPIPS when measured;
    * rollout PSNR by step (pooled, dB), noise augmentation on and off;
    * agent versus random-policy data: single-frame PSNR and PSNR at the end of each rollout;
    * the action warp and residual targets on and off: PSNR, controllability and the rollout crossing.
    """
    settings: dict[str, list[Result]] = {}
    for r in results:
        settings.setdefault(setting_of(r.label), []).append(r)
    base = settings.get("base")
    if not base:
        raise AblationError("no 'base' ablation experiment among the results; run the ablations first")
    varied = [ablations.context_key, ablations.data_key, *ablations.noise_off, *ablations.warp_off]

    def varying_only(key: str) -> list[list[Result]]:
        return [g for g in settings.values()
                if all(_same(_lookup(g[0].params, k), _lookup(base[0].params, k)) for k in varied if k != key)]

    seeds = max(len(group) for group in settings.values())
    out: list[str] = []
    if seeds > 1:
        out += [f"Each setting ran with {seeds} seeds (`evaluation.ablations.seed_keys`); a cell is the mean ± half "
                "the spread between them.", ""]
    out += _context_table(varying_only(ablations.context_key), ablations.context_key, model)
    out += _noise_table(settings, base, model)
    out += _data_table(varying_only(ablations.data_key), ablations.data_key, base, model)
    if settings.get("warp-off"):
        out += _warp_table(settings, base, model)
    return "\n".join(out) + "\n"


def _context_table(groups: list[list[Result]], key: str, model: str) -> list[str]:
    tf = f"{model}.teacher_forced"
    out = ["### Context length", "",
           f"Next-frame PSNR (dB) on held-out play, {model} model; paper Table (context): 64 -> 22.36 ... 1 -> 20.94.",
           "",
           "| context | PSNR pooled | PSNR mean (cap 50) | PSNR median | margin vs copy-last-latent | teacher PSNR "
           "pooled | LPIPS |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for g in sorted(groups, key=lambda g: -(_lookup(g[0].params, key) or 0)):
        out.append(
            f"| {_lookup(g[0].params, key)} | {_stat(g, f'{tf}.psnr.model.pooled')} | "
            f"{_stat(g, f'{tf}.psnr.model.mean')} | {_stat(g, f'{tf}.psnr.model.median')} | "
            f"{_stat(g, f'{tf}.margin_db.copy_last_latent.pooled')} | "
            f"{_stat(g, 'teacher.teacher_forced.psnr.model.pooled')} | {_stat(g, f'lpips.{model}', 3)} |")
    return out


def _noise_table(settings: Mapping[str, list[Result]], base: list[Result], model: str) -> list[str]:
    steps = _rollout_steps(base[0].metrics, model)
    out = ["", "### Noise augmentation", "",
           f"Autoregressive rollout PSNR (pooled, dB) by step, {model} model, driven by the recorded actions. "
           "The paper shows this only as a plot: without noise augmentation quality drops after 10 to 20 frames.", "",
           "| noise augmentation | " + " | ".join(f"step {s}" for s in steps) + " | crosses copy-last-latent at |",
           "| --- | " + " | ".join("---" for _ in steps) + " | --- |"]
    sharpness_rows = []  # what the PSNR curve hides (issue 12's measures); absent from older results
    for label, on in (("base", "on"), ("noise-off", "off")):
        group = settings.get(label)
        if not group:
            continue
        longest = _longest_rollout(group[0].metrics, model)
        rollout = f"{model}.rollout.{longest}"
        values = [_stat(group, f"{rollout}.psnr_at_step.{s}") for s in steps]
        out.append(f"| {on} | " + " | ".join(values) + f" | {_crossings(group, model, longest)} |")
        if _lookup(group[0].metrics, f"{rollout}.sharpness_at_step"):
            sharpness = [_stat(group, f"{rollout}.sharpness_at_step.{s}") for s in steps]
            sharpness_rows.append(f"| {on} | " + " | ".join(sharpness)
                                  + f" | {_stat(group, f'{model}.long_play.end.colour_distance')} |")
    if not sharpness_rows:
        return out
    return out + ["", "Sharpness of the same rollouts by step (Laplacian energy above the HUD over the real frames': 1 "
                  "is as sharp as the game, below 1 is blur), and the colour distance from the real frames at the end "
                  "of long play (player-like keys; lower is closer; README \"The `evaluation` stage\").", "",
                  "| noise augmentation | " + " | ".join(f"sharpness, step {s}" for s in steps)
                  + " | long-play colour distance |",
                  "| --- | " + " | ".join("---" for _ in steps) + " | --- |", *sharpness_rows]


def _data_table(groups: list[list[Result]], key: str, base: list[Result], model: str) -> list[str]:
    lengths = sorted(int(k) for k in (_lookup(base[0].metrics, f"{model}.rollout") or {}))
    out = ["", "### Agent versus random-policy data", "",
           "Paper: single frame 25.06 vs 24.42 dB; after 3 s of generation 19.02 vs 16.84 dB. Here each row is "
           "scored on the held-out episodes of its own recording, so the two rows see different play.", "",
           "| data | single-frame PSNR | " + " | ".join(f"PSNR at step {n}" for n in lengths) + " |",
           "| --- | --- | " + " | ".join("---" for _ in lengths) + " |"]
    for g in sorted(groups, key=lambda g: str(_lookup(g[0].params, key))):
        finals = [_stat(g, f"{model}.rollout.{n}.final_step_psnr.model") for n in lengths]
        out.append(f"| {_lookup(g[0].params, key)} | {_stat(g, f'{model}.teacher_forced.psnr.model.pooled')} | "
                   + " | ".join(finals) + " |")
    return out


def _warp_table(settings: Mapping[str, list[Result]], base: list[Result], model: str) -> list[str]:
    tf = f"{model}.teacher_forced"
    longest = _longest_rollout(base[0].metrics, model)
    out = ["", "### The action warp and residual targets", "",
           "Not in the paper: `world_model.action_warp` feeds the UNet the last latent moved by the measured motion "
           "of its action, and `predict_residual` diffuses the difference to it (README \"World model\"); off is the "
           "paper's plain UNet.", "",
           "| warp and residual | PSNR pooled | margin vs copy-last-latent | controllability turning | "
           f"controllability moving | turn pan left / right, share of the real game's | {longest}-step rollout "
           "crosses copy-last-latent at |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, on in (("base", "on"), ("warp-off", "off")):
        g = settings[label]
        pan = " / ".join(_stat(g, f"{model}.turn_response.{turn}.fraction_of_real")
                         for turn in ("turn_left", "turn_right"))
        out.append(f"| {on} | {_stat(g, f'{tf}.psnr.model.pooled')} | "
                   f"{_stat(g, f'{tf}.margin_db.copy_last_latent.pooled')} | "
                   f"{_stat(g, f'{tf}.controllability.turning.share')} | "
                   f"{_stat(g, f'{tf}.controllability.moving.share')} | {pan} | {_crossings(g, model, longest)} |")
    return out


def _crossings(group: Sequence[Result], model: str, steps: str) -> str:
    """The crossing step of each seed's ``steps``-step rollout ("never" where it stays above copy-last-latent)."""
    values = [_lookup(r.metrics, f"{model}.rollout.{steps}.crossing_step.copy_last_latent") for r in group]
    return ", ".join("never" if v is None else str(v) for v in values)


def _longest_rollout(metrics: Mapping[str, Any], model: str) -> str:
    rollouts = _lookup(metrics, f"{model}.rollout") or {}
    return max(rollouts, key=int) if rollouts else "0"


def _rollout_steps(metrics: Mapping[str, Any], model: str) -> list[int]:
    longest = _longest_rollout(metrics, model)
    shown = _lookup(metrics, f"{model}.rollout.{longest}.psnr_at_step") or {}
    return sorted(int(s) for s in shown)


def scale_note(overrides: Sequence[str]) -> str:
    """The line that says at which scale the experiments ran (``evaluation.ablations.overrides``)."""
    if not overrides:
        return "Every experiment ran at the profile's own scale.\n\n"
    values = ", ".join(f"`{item}`" for item in overrides)
    return (f"**Scale**: every experiment ran with {values} (`evaluation.ablations.overrides`), far below the "
            "profile's own training budgets, so differences of a few tenths of a dB are within noise.\n\n")


def write_results(path: Path, body: str, command: str, tag: str, profile: str,
                  overrides: Sequence[str] = ()) -> None:
    """Write ``docs/results.md``: the command that made the tables, the date, the scale and the tables."""

    today = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        "# Results: the paper's ablations as DVC experiments\n\n"
        f"Made on {today} by `{command}` (profile `{profile}`, experiment tag `{tag}`), on held-out episodes.\n"
        "Each row is a DVC experiment (`dvc exp show` lists them as `abl-<tag>-<label>`). PSNR is in dB; "
        "`pooled` is the PSNR of the mean squared error over all windows, `mean` the mean per-frame PSNR with "
        "identical frames capped at 50 dB. Rerun with `make ablations`.\n\n"
    )
    header += scale_note(overrides)
    if profile == "micro":
        header += MICRO_CAVEAT
    atomic_write_text(path, header + body)
