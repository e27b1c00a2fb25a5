"""``gamengen restore``: bring every stage output back to what ``dvc.lock`` records, metrics and plots included.

After a stage failed or was killed (DVC had already removed its outputs), or after outputs were edited by hand:
``dvc checkout`` restores the cached outputs (``data/...``), and the ``cache: false`` ones (metrics, plots)
come back from the run-cache entry DVC saved when the stage last succeeded. Params and code are not touched:
the stage a change left stale stays stale, exactly as ``dvc status`` says.

    .venv/bin/python -m components restore
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dvc.exceptions import CheckoutError
from dvc.repo import Repo
from dvc.stage.serialize import to_single_stage_lockfile

from components.errors import PipelineError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", default=".", help="the DVC project (default: the current directory)")


def locked_stages(repo: Any) -> list[Any]:
    """The stages dvc.lock records outputs for (a stage that never ran has nothing to restore)."""
    return [stage for stage in repo.index.stages
            if stage.cmd and stage.outs and all(out.hash_info for out in stage.outs)]


def restore_uncached_outputs(repo: Any) -> tuple[list[str], list[str]]:
    """The ``cache: false`` outputs of each stage in dvc.lock that differ from it, checked out from the objects its
    run-cache entry committed. Returns (restored, missing) paths. Uses DVC's own run-cache machinery
    (``stage_cache._create_stage``, as ``dvc repro`` restores a cached run; pinned DVC version)."""

    restored, missing = [], []
    for stage in locked_stages(repo):
        uncached = {out.def_path for out in stage.outs if not out.use_cache}
        if not uncached:
            continue
        locked = repo.stage_cache._create_stage(to_single_stage_lockfile(stage), wdir=stage.wdir)
        with repo.stage_cache._cache_type_copy():  # plain copies, as a file tracked by git would be
            for out in locked.outs:
                if out.def_path not in uncached or (out.exists and not out.changed_checksum()):
                    continue  # cached outputs are dvc checkout's; this one is as dvc.lock says
                if out.changed_cache():  # never committed (no run-cache entry): leave the workspace as it is
                    missing.append(f"{out.def_path} (stage {stage.addressing})")
                    continue
                try:
                    out.checkout(force=True)
                except CheckoutError:
                    missing.append(f"{out.def_path} (stage {stage.addressing})")
                    continue
                restored.append(out.def_path)
    return restored, missing


def main(args: argparse.Namespace) -> None:
    root = Path(args.repo)
    if not (root / "dvc.lock").is_file():
        raise PipelineError(f"{root / 'dvc.lock'}: not found; nothing to restore (no stage has run here yet)")
    with Repo(str(root)) as repo:
        stages = locked_stages(repo)
        if not stages:
            raise PipelineError(f"{root / 'dvc.lock'}: records no stage outputs; nothing to restore")
        try:
            stats = repo.checkout(targets=[stage.addressing for stage in stages], force=True)
        except CheckoutError as error:
            raise PipelineError(f"dvc checkout could not restore {error}; pull them (dvc pull) or rerun "
                                "the stages that wrote them (dvc repro)") from None
        with repo.lock:
            restored, missing = restore_uncached_outputs(repo)
    changed = sorted({*stats.get("added", []), *stats.get("modified", []), *restored})
    print(f"restored {len(changed)} outputs to dvc.lock" + (": " + ", ".join(changed) if changed else ""))
    if missing:
        raise PipelineError("not in the DVC cache, so not restored: " + ", ".join(missing) +
                            "; rerun those stages (python -m components repro <stage>)")
