"""dvc.yaml's code deps are complete: every module of components/ that a stage's command imports (directly or
through other modules, at the top or inside a function) is a dep of the stage, so editing it reruns the stage."""

from __future__ import annotations

import ast
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.processes import REPO_ROOT, run

# The command-line machinery every stage runs through; editing it changes no stage's output.
ENTRY_POINT = {"components/__init__.py", "components/__main__.py", "components/cli.py", "components/errors.py",
               "components/stages/__init__.py"}
# `python -m components <command>` -> the module it runs, where it is not components/stages/<command>.py
COMMAND_MODULES = {"play": "components/play/server.py"}


def package_markers() -> set[str]:
    """The ``__init__.py`` of components/'s packages: a docstring only (a test below keeps it so), so importing a
    package runs no code and they are no stage's dependency."""
    return {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "components").glob("*/__init__.py")}


def module_path(dotted: str) -> str | None:
    """``components.models.sampler`` -> ``components/models/sampler.py`` (None for a name that is not a module)."""
    path = REPO_ROOT.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return str(candidate.relative_to(REPO_ROOT))
    return None


def type_checking_blocks(tree: ast.Module) -> set[ast.AST]:
    """The statements under ``if TYPE_CHECKING:``: imports for annotations only, which never run."""
    return {child for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
            for statement in node.body for child in ast.walk(statement)}


def project_imports(path: str) -> set[str]:
    """The components/ modules that ``path`` imports anywhere in its body (annotation-only imports aside)."""
    names: set[str] = set()
    tree = ast.parse((REPO_ROOT / path).read_text())
    annotation_only = type_checking_blocks(tree)
    for node in ast.walk(tree):
        if node in annotation_only:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {found for name in names if name.split(".")[0] == "components" if (found := module_path(name))}


def imported_closure(path: str) -> set[str]:
    seen: set[str] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += project_imports(current)
    return seen - ENTRY_POINT - package_markers()


def stage_command_module(cmd: str) -> str:
    words = cmd.split()
    assert words[:3] == ["python", "-m", "components"], f"not a components command: {cmd}"
    return COMMAND_MODULES.get(words[3], f"components/stages/{words[3]}.py")


def test_every_stage_lists_exactly_the_components_modules_its_command_imports() -> None:
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    missing, extra = {}, {}
    for name, stage in stages.items():
        body = stage.get("do", stage)  # a foreach stage's template
        deps = {dep if isinstance(dep, str) else next(iter(dep)) for dep in body.get("deps", [])}
        needed = imported_closure(stage_command_module(body["cmd"]))
        listed = {dep for dep in deps if dep.startswith("components/") and dep.endswith(".py")}
        if needed - deps:
            missing[name] = sorted(needed - deps)
        if listed - needed:
            extra[name] = sorted(listed - needed)
    assert missing == {}, f"dvc.yaml stages miss code deps (a change there would not rerun them): {missing}"
    assert extra == {}, f"dvc.yaml stages list code they do not import (a change there would rerun them): {extra}"


def test_the_packages_of_components_run_no_code_on_import() -> None:
    for marker in sorted(package_markers()):
        body = ast.parse((REPO_ROOT / marker).read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), (
            f"{marker} should hold its docstring only (the modules are imported by their own names)")


def test_the_import_walk_sees_imports_inside_functions() -> None:
    closure = imported_closure("components/stages/promote.py")
    assert "components/evaluation/promotion.py" in closure  # imported inside main()
    assert "components/evaluation/scoring.py" in closure  # through promotion.reevaluate_champion, inside a function
    assert "components/cli.py" not in closure


# --------------------------------------------------------------------------- paths: written once, in dvc.yaml

NOT_PATHS = {"--shard"}  # command options whose value is not a path
# outs a stage finds through params.yaml rather than its command line: out -> the params key that must equal it
OUTS_FROM_PARAMS = {"artifacts/champion": ("evaluation", "promotion", "champion_dir")}


def declared_paths(body: dict, *fields: str) -> set[str]:
    return {entry if isinstance(entry, str) else next(iter(entry)) for field in fields for entry in body.get(field, [])}


def under(path: str, folders: set[str]) -> bool:
    return any(path == folder or path.startswith(folder.rstrip("/") + "/") for folder in folders)


def command_paths(cmd: str) -> dict[str, str]:
    """``--flag value`` pairs of a stage command (``python -m components <stage> ...``), paths only."""
    words = shlex.split(cmd)[4:]
    assert len(words) % 2 == 0 and all(w.startswith("--") for w in words[::2]), f"not flag-value pairs: {cmd}"
    pairs = zip(words[::2], words[1::2], strict=True)
    return {flag: value for flag, value in pairs if flag not in NOT_PATHS}


def test_every_stage_gets_its_paths_from_its_command_and_dvc_tracks_each_one() -> None:
    """No stage has an artifact path of its own: each path option is required, dvc.yaml's command passes it, and
    each passed path is a declared dep or out of the stage or a folder of its outs (so DVC tracks what the code
    reads and writes), and each declared out is something the command names."""
    from components.cli import build_parser

    raw = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    parser = build_parser()
    problems: list[str] = []
    for name, stage in raw["stages"].items():
        body = stage.get("do", stage)
        words = shlex.split(body["cmd"].replace("${item}", "0"))
        paths = command_paths(body["cmd"])
        declared = declared_paths(body, "deps", "outs", "metrics", "plots")
        problems += [f"{name}: {flag} {path} is not a dep or out, nor a folder of outs" for flag, path in paths.items()
                     if not under(path, declared) and not any(under(d, {path}) for d in declared)]
        for flag in paths:
            index = words.index(flag)
            with pytest.raises(SystemExit):
                parser.parse_args(words[3:index] + words[index + 2:])  # without it: argparse refuses
        for out in declared_paths(body, "outs", "metrics", "plots"):
            if out in OUTS_FROM_PARAMS:
                section, *keys = OUTS_FROM_PARAMS[out]
                value = params[section]
                for key in keys:
                    value = value[key]
                if value != out:
                    problems.append(f"{name}: out {out} but params.yaml {'.'.join(OUTS_FROM_PARAMS[out])} is {value}")
            elif not under(out, set(paths.values())):
                problems.append(f"{name}: out {out} is named by no option of its command")
    assert problems == [], "\n".join(problems)


def restored_from_run_cache(stage: Any) -> bool:
    """Whether DVC saves a run-cache entry for ``stage`` (a ``dvc.stage.Stage``), so that it is restored, not rerun,
    when its deps and params come back to ones it has run with (an experiment, a revert, another clone). DVC's own
    rule (``Stage.run`` and ``dvc.stage.cache._can_hash``): no persistent out, and no ``cache: false`` out that is
    neither a metric nor a plot."""
    return not any(out.persist or (not out.use_cache and not (out.is_metric or out.is_plot)) for out in stage.outs)


TOY_STAGES: dict[str, list[Any]] = {  # name -> outs (each writes its files); DVC decides which get a run-cache entry
    "report_uncached": ["out_a", {"report_a.json": {"cache": False}}],
    "report_cached": ["out_b", "report_b.json"],
    "state_persists": [{"out_c": {"persist": True}}],
}


def test_every_stage_but_the_champion_is_restored_from_the_run_cache(tmp_path: Path) -> None:
    """A real DVC repo shows the rule ``restored_from_run_cache`` states; by it, every stage of dvc.yaml gets a
    run-cache entry except ``champion``, whose ``artifacts/champion`` persists between runs by design. (The
    latent gate's and the ONNX parity reports were ``cache: false`` until 2026-12-08, so ``validated_latents`` and
    ``onnx_export`` recomputed in every ablation experiment, and ``restore`` could not bring their reports back.)"""
    from dvc.repo import Repo

    run(["git", "init", "-q"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    (tmp_path / "dep").write_text("x")
    stages = {}
    for name, outs in TOY_STAGES.items():
        files = [next(iter(out)) if isinstance(out, dict) else out for out in outs]
        stages[name] = {"cmd": " && ".join(f"cp dep {file}" for file in files), "deps": ["dep"], "outs": outs}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    run(["dvc", "repro", "-q"], tmp_path)
    entries = [yaml.safe_load(path.read_text())["cmd"] for path in (tmp_path / ".dvc/cache/runs").rglob("*")
               if path.is_file()]
    with Repo(str(tmp_path)) as repo:
        rule = {stage.name: restored_from_run_cache(stage) for stage in repo.index.stages}
    assert rule == {"report_uncached": False, "report_cached": True, "state_persists": False}
    assert {name: stages[name]["cmd"] in entries for name in TOY_STAGES} == rule

    with Repo(str(REPO_ROOT)) as repo:
        rerun_every_time = sorted({stage.name.split("@")[0] for stage in repo.index.stages
                                   if not restored_from_run_cache(stage)})
    assert rerun_every_time == ["champion"]
