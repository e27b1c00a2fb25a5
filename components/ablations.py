"""The paper's ablations as DVC experiments, and the tables they make in ``docs/results.md``.

``python -m components ablations`` (also ``make ablations``) queues one DVC experiment per setting with
``dvc exp run --queue -n abl-<tag>-<label> -S key=value ...``, runs the queue (``dvc exp run --run-all``),
then reads ``dvc exp show --json`` and writes the tables. ``--report-only`` rewrites the tables from the
experiments already in the repo. The settings (``evaluation.ablations`` in params.yaml):

* context length K: ``world_model.context`` in ``context_lengths`` (paper: 1, 2, 4, 8, 16, 32, 64);
* noise augmentation on and off: on is the baseline, off applies ``noise_off`` (no context noise in
  training nor at inference);
* agent versus random-policy data: ``raw_trajectories.policy`` in ``data_policies``;
* ``overrides`` are applied to every experiment (e.g. fewer training steps, for "a small scale").

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
from typing import Any

from components.errors import PipelineError
from components.promotion import metric_value

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


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c.d=text"]`` -> ``{"a.b": 1, "c.d": "text"}`` (values read as YAML, as ``dvc exp run -S`` does)."""
    import yaml

    pairs = (item.split("=", 1) for item in items)
    return {key.strip(): yaml.safe_load(value) for key, value in pairs}


def plan(ablations: Any, baseline: Mapping[str, Any], groups: Iterable[str] = ("context", "noise", "data")) -> list[Experiment]:
    """The experiments to run. ``ablations`` is ``params.evaluation.ablations``; ``baseline`` the params dict
    (to know the current K and policy, which the baseline experiment already covers)."""
    groups = set(groups)
    unknown = groups - {"context", "noise", "data"}
    if unknown:
        raise AblationError(f"unknown ablation groups {sorted(unknown)}; choose from context, noise, data")
    common = parse_overrides(ablations.overrides)
    base_k = metric_value(baseline, ablations.context_key)
    base_policy = _lookup(baseline, ablations.data_key)
    experiments = [Experiment("base", common)]
    if "context" in groups:
        experiments += [Experiment(f"context-{k}", {**common, ablations.context_key: k})
                        for k in ablations.context_lengths if k != base_k]
    if "noise" in groups:
        experiments.append(Experiment("noise-off", {**common, **ablations.noise_off}))
    if "data" in groups:
        experiments += [Experiment(f"data-{p}", {**common, ablations.data_key: p})
                        for p in ablations.data_policies if p != base_policy]
    return experiments


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
        raise AblationError(f"`{' '.join(command)}` failed ({result.returncode}):\n{result.stdout or ''}{result.stderr or ''}")
    return result


def queue_and_run(experiments: Sequence[Experiment], repo: Path, tag: str, jobs: int = 1) -> list[str]:
    """Queue every experiment, run the queue (blocking), and fail naming any experiment that failed."""
    names = []
    for experiment in experiments:
        name = experiment.name(tag)
        args = ["exp", "run", "--queue", "-n", name]
        for value in experiment.set_params():
            args += ["-S", value]
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


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))


def tables(results: Sequence[Result], ablations: Any, model: str = "onnx") -> str:
    """Markdown tables shaped like the paper's, from one tag's results.

    * context length against next-frame PSNR (three views), the teacher's pooled PSNR, and LPIPS when measured;
    * rollout PSNR by step (pooled, dB), noise augmentation on and off;
    * agent versus random-policy data: single-frame PSNR and PSNR at the end of each rollout.
    """
    by_label = {r.label: r for r in results}
    base = by_label.get("base")
    if base is None:
        raise AblationError("no 'base' ablation experiment among the results; run the ablations first")
    key_k, key_data = ablations.context_key, ablations.data_key
    noise_keys = list(ablations.noise_off)

    def varies_only(r: Result, key: str | None) -> bool:
        keys = {key_k, key_data, *noise_keys} - ({key} if key else set())
        return all(_same(_lookup(r.params, k), _lookup(base.params, k)) for k in keys)

    out: list[str] = []
    tf = f"{model}.teacher_forced"
    # context length
    rows = sorted((r for r in results if varies_only(r, key_k)), key=lambda r: -(_lookup(r.params, key_k) or 0))
    out += ["### Context length", "",
            f"Next-frame PSNR (dB) on held-out play, {model} model; paper Table (context): 64 -> 22.36 ... 1 -> 20.94.", "",
            "| context | PSNR pooled | PSNR mean (cap 50) | PSNR median | margin vs copy-last-latent | teacher PSNR pooled | LPIPS |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        m = r.metrics
        out.append(
            f"| {_lookup(r.params, key_k)} | {_num(metric_value(m, f'{tf}.psnr.model.pooled'))} | "
            f"{_num(metric_value(m, f'{tf}.psnr.model.mean'))} | {_num(metric_value(m, f'{tf}.psnr.model.median'))} | "
            f"{_num(metric_value(m, f'{tf}.margin_db.copy_last_latent.pooled'), 2)} | "
            f"{_num(metric_value(m, 'teacher.teacher_forced.psnr.model.pooled'))} | "
            f"{_num(metric_value(m, f'lpips.{model}'), 3)} |")
    # noise augmentation
    noise_rows = [r for r in results if varies_only(r, None) or r.label == "noise-off"]
    noise_rows = [r for r in noise_rows if r.label in ("base", "noise-off")]
    steps = _rollout_steps(base.metrics, model)
    out += ["", "### Noise augmentation", "",
            f"Autoregressive rollout PSNR (pooled, dB) by step, {model} model, driven by the recorded actions. "
            "The paper shows this only as a plot: without noise augmentation quality drops after 10 to 20 frames.", "",
            "| noise augmentation | " + " | ".join(f"step {s}" for s in steps) + " | crosses copy-last-latent at |",
            "| --- | " + " | ".join("---" for _ in steps) + " | --- |"]
    for r in sorted(noise_rows, key=lambda r: r.label != "base"):
        longest = _longest_rollout(r.metrics, model)
        values = [_num(metric_value(r.metrics, f"{model}.rollout.{longest}.psnr_at_step.{s}")) for s in steps]
        cross = _lookup(r.metrics, f"{model}.rollout.{longest}.crossing_step.copy_last_latent")
        out.append(f"| {'on' if r.label == 'base' else 'off'} | " + " | ".join(values) +
                   f" | {cross if cross is not None else 'never'} |")
    # data
    data_rows = [r for r in results if varies_only(r, key_data)]
    lengths = sorted(int(k) for k in (_lookup(base.metrics, f"{model}.rollout") or {}))
    out += ["", "### Agent versus random-policy data", "",
            "Paper: single frame 25.06 vs 24.42 dB; after 3 s of generation 19.02 vs 16.84 dB. Here each row is "
            "scored on the held-out episodes of its own recording, so the two rows see different play.", "",
            "| data | single-frame PSNR | " + " | ".join(f"PSNR at step {n}" for n in lengths) + " |",
            "| --- | --- | " + " | ".join("---" for _ in lengths) + " |"]
    for r in sorted(data_rows, key=lambda r: str(_lookup(r.params, key_data))):
        finals = [_num(metric_value(r.metrics, f"{model}.rollout.{n}.final_step_psnr.model")) for n in lengths]
        out.append(f"| {_lookup(r.params, key_data)} | {_num(metric_value(r.metrics, f'{tf}.psnr.model.pooled'))} | "
                   + " | ".join(finals) + " |")
    return "\n".join(out) + "\n"


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
    from components.atomic import atomic_write_text

    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
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
