"""Read the DVC pipeline (``dvc.yaml`` + ``dvc.lock``) into plain data that the Dagster side turns into assets.

The graph comes from DVC's own stage index, ``dvc.repo.Repo(root).index``, so ``foreach``/``matrix`` stages,
interpolated params and several ``dvc.yaml`` files are expanded exactly as ``dvc repro`` sees them.

Vocabulary:
- an *item* is one DVC stage address: ``rl_agent`` or, for a foreach/matrix stage, ``raw_trajectories@0``;
- a *group* is what becomes one Dagster asset: a plain stage (one item, not partitioned) or all the items of a
  foreach/matrix stage (one item per partition, partition key = the part after ``@``).

Versions (see ``code_version`` and ``data_version``):
- code version = hash of the item's cmd, the values of its params and the content of its code deps (deps that
  are not produced by another stage), combined with the code versions of its upstream stages: it changes
  when DVC would rerun the stage or one of its ancestors for a reason of their own.
- data version = hash of the item's outs as recorded in ``dvc.lock``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from components.errors import PipelineError

log = logging.getLogger(__name__)

# Folders never hashed as part of a code dep that is a directory.
_SKIP_DIRS = {"__pycache__", ".git", ".dvc", ".venv", "node_modules"}
# Convention: a gating validation report is `reports/<name>.json`, listed in outs (cached or not).
REPORTS_DIR = "reports"


class DvcGraphError(PipelineError):
    """dvc.yaml cannot be turned into assets (DVC's own message is included)."""


@dataclass(frozen=True)
class StageItem:
    """One DVC stage as `dvc repro --single-item <address>` runs it."""

    address: str  # "name" or "name@key" ("sub/dvc.yaml:name" for a stage of another dvc.yaml)
    lock_key: str  # its key in dvc.lock: "name" or "name@key"
    group: str  # "name"
    key: str | None  # foreach/matrix key, None for a plain stage
    cmd: str
    dvcfile: str  # path of its dvc.yaml, relative to the repo root
    lockfile: str  # path of its dvc.lock, relative to the repo root
    params: dict[str, Any]  # "file:key" -> value, as DVC reads them
    code_deps: tuple[str, ...]  # deps not produced by any stage (repo-relative)
    data_deps: tuple[str, ...]  # deps produced by an upstream stage
    outs: tuple[str, ...]  # all outs, metrics and plots included
    uncached_outs: tuple[str, ...]  # outs with `cache: false` (metrics, plots, `champion`'s report)
    metrics: tuple[str, ...]
    plots: tuple[str, ...]
    reports: tuple[str, ...]  # outs under reports/ ending in .json (gating validation reports)
    upstream: tuple[str, ...]  # addresses of the items this one depends on
    desc: str | None = None


@dataclass
class StageGroup:
    """One Dagster asset: a plain stage, or the items of a foreach/matrix stage (its partitions)."""

    name: str
    items: dict[str | None, StageItem] = field(default_factory=dict)  # key -> item (key None if plain)

    @property
    def partitioned(self) -> bool:
        return any(key is not None for key in self.items)

    @property
    def partition_keys(self) -> list[str]:
        return [key for key in self.items if key is not None]

    @property
    def upstream_groups(self) -> list[str]:
        found = {group_of(address) for item in self.items.values() for address in item.upstream}
        found.discard(self.name)
        return sorted(found)

    def item(self, key: str | None) -> StageItem:
        try:
            return self.items[key]
        except KeyError:
            raise DvcGraphError(f"stage {self.name!r} has no item {key!r}; it has {list(self.items)}") from None

    @property
    def reports(self) -> list[str]:
        return sorted({report for item in self.items.values() for report in item.reports})

    @property
    def description(self) -> str:
        first = next(iter(self.items.values()))
        lines = [first.desc or f"DVC stage `{self.name}` ({first.dvcfile})", "", f"`{first.cmd}`"]
        if self.partitioned:
            lines += ["", f"foreach/matrix stage: one partition per key ({', '.join(self.partition_keys)})"]
        return "\n".join(lines)


@dataclass
class DvcPipeline:
    """All stage groups of a DVC project, in dvc.yaml order, with the item-level edges."""

    root: Path
    groups: dict[str, StageGroup]

    def item_edges(self) -> set[tuple[str, str]]:
        """(upstream address, downstream address) for every item-level dependency."""
        items = [item for group in self.groups.values() for item in group.items.values()]
        return {(up, item.address) for item in items for up in item.upstream}

    def group_edges(self) -> set[tuple[str, str]]:
        """(upstream group, downstream group): the asset-level lineage."""
        return {(up, group.name) for group in self.groups.values() for up in group.upstream_groups}

    def item(self, address: str) -> StageItem:
        name, _, key = address.rpartition(":")[2].partition("@")
        return self.groups[name].item(key or None)


def group_of(address: str) -> str:
    """`sub/dvc.yaml:name@key` -> `name`."""
    return address.rpartition(":")[2].partition("@")[0]


def split_address(address: str) -> tuple[str, str | None]:
    """`name@key` -> (`name`, `key`); `name` -> (`name`, None)."""
    name, _, key = address.rpartition(":")[2].partition("@")
    return name, key or None


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _is_report(path: str) -> bool:
    return _under(path, REPORTS_DIR) and path.endswith(".json")


@contextlib.contextmanager
def _lockfile_ignored() -> Iterator[None]:
    """DVC reads stages without their dvc.lock entries (the graph and the code versions do not need them)."""
    from dvc.dvcfile import Lockfile

    original = Lockfile.load
    Lockfile.load = lambda self, **kwargs: {}
    try:
        yield
    finally:
        Lockfile.load = original


def load_pipeline(root: str | Path) -> DvcPipeline:
    """Read every pipeline stage of the DVC project at ``root`` through DVC's stage index.

    A corrupted ``dvc.lock`` does not stop it: the graph comes from ``dvc.yaml`` alone then (one warning), so the
    Dagster UI still loads; the data versions, read from ``dvc.lock`` itself, are simply unknown.
    """
    root = Path(root).resolve()
    try:
        return _load_pipeline(root)
    except DvcGraphError as error:
        if "dvc.lock" not in str(error):
            raise
        log.warning("%s; the stage graph is read from dvc.yaml alone", error)
        with _lockfile_ignored():
            return _load_pipeline(root)


def _load_pipeline(root: Path) -> DvcPipeline:
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    try:
        repo = Repo(str(root))
    except DvcException as error:
        raise DvcGraphError(f"{root}: not a DVC project ({error}); run `dvc init` there") from None
    try:
        try:
            index = repo.index
            stages = [s for s in index.stages if isinstance(s, PipelineStage)]
            graph = index.graph
        except DvcException as error:
            raise DvcGraphError(f"{root}: dvc.yaml cannot be read: {error}") from None

        produced = [_rel(root, out.fs_path) for stage in stages for out in stage.outs]
        depends_on: dict[str, set[str]] = {_address(root, s): set() for s in stages}
        for downstream, upstream in graph.edges:  # an edge (a, b) means a depends on b
            if isinstance(downstream, PipelineStage) and isinstance(upstream, PipelineStage):
                depends_on[_address(root, downstream)].add(_address(root, upstream))

        groups: dict[str, StageGroup] = {}
        for stage in stages:
            item = _item(root, stage, produced, sorted(depends_on[_address(root, stage)]))
            group = groups.setdefault(item.group, StageGroup(item.group))
            if item.key in group.items:
                raise DvcGraphError(f"two stages are both named {item.address!r}: asset keys must be unique")
            group.items[item.key] = item
        for group in groups.values():
            if group.partitioned and None in group.items:
                raise DvcGraphError(f"stage name {group.name!r} is used both plain and as foreach/matrix")
        return DvcPipeline(root=root, groups=groups)
    finally:
        repo.close()


def _rel(root: Path, fs_path: str) -> str:
    path = Path(fs_path)
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(fs_path)  # outside the repo (external dep)


def _address(root: Path, stage: Any) -> str:
    """The stage as `dvc repro` takes it from the repo root: `name[@key]`, prefixed by `path/dvc.yaml:` if
    the stage lives in another dvc.yaml than the root one."""
    dvcfile = _rel(root, stage.dvcfile.path)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _item(root: Path, stage: Any, produced: list[str], upstream: list[str]) -> StageItem:
    from dvc.dependency.param import ParamsDependency

    name, _, key = stage.name.partition("@")
    params: dict[str, Any] = {}
    code_deps, data_deps = [], []
    for dep in stage.deps:
        if isinstance(dep, ParamsDependency):
            file = _rel(root, dep.fs_path)
            for param_key, value in sorted(dep.read_params().items()):
                params[f"{file}:{param_key}"] = value
            continue
        path = _rel(root, dep.fs_path)
        # An upstream out (or a file inside an upstream out dir) is data; anything else is code/source.
        if any(_under(path, out) or _under(out, path) for out in produced):
            data_deps.append(path)
        else:
            code_deps.append(path)
    outs = [_rel(root, out.fs_path) for out in stage.outs]
    dvcfile = _rel(root, stage.dvcfile.path)
    return StageItem(
        address=_address(root, stage),
        lock_key=stage.name,
        group=name,
        key=key or None,
        cmd=stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd),
        dvcfile=dvcfile,
        lockfile=str(Path(dvcfile).with_suffix(".lock")),
        params=params,
        code_deps=tuple(code_deps),
        data_deps=tuple(data_deps),
        outs=tuple(outs),
        uncached_outs=tuple(o for o, out in zip(outs, stage.outs, strict=True) if not out.use_cache),
        metrics=tuple(_rel(root, o.fs_path) for o in stage.outs if o.metric),
        plots=tuple(o for o, out in zip(outs, stage.outs, strict=True) if out.plot or _under(o, "plots")),
        reports=tuple(o for o in outs if _is_report(o)),
        upstream=tuple(upstream),
        desc=getattr(stage, "desc", None),
    )


# --------------------------------------------------------------------------- versions


def _hash_path(root: Path, relpath: str, digest: Any) -> None:
    """Feed a file's content, or every file of a directory (sorted), into ``digest``. Missing: its name only."""
    path = root / relpath
    digest.update(relpath.encode() + b"\0")
    if path.is_file():
        digest.update(path.read_bytes())
    elif path.is_dir():
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for filename in sorted(filenames):
                if filename.endswith(".pyc"):
                    continue
                file = Path(dirpath) / filename
                digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    else:
        digest.update(b"<missing>")


def item_code_version(root: Path, item: StageItem) -> str:
    """Hash of cmd + param values + code-dep content: what makes DVC rerun a stage besides its inputs' data."""
    digest = hashlib.sha256()
    digest.update(item.cmd.encode() + b"\0")
    digest.update(json.dumps(item.params, sort_keys=True, default=str).encode() + b"\0")
    for dep in sorted(item.code_deps):
        _hash_path(root, dep, digest)
    return digest.hexdigest()[:16]


def group_code_version(root: Path, group: StageGroup) -> str:
    """The stage's own code version; for a foreach stage all items combined (Dagster has one per asset)."""
    if not group.partitioned:
        return item_code_version(root, group.item(None))
    digest = hashlib.sha256()
    for key in sorted(group.partition_keys):
        digest.update(f"{key}={item_code_version(root, group.items[key])};".encode())
    return digest.hexdigest()[:16]


def code_versions(pipeline: DvcPipeline) -> dict[str, str]:
    """Code version of every asset: its own (``group_code_version``) combined with its upstream assets'.

    Including the upstream versions makes a change (say a param) mark that stage AND everything downstream
    unsynced at once, which is what `dvc repro` reruns; Dagster alone would only flag the downstream stages
    after the changed stage has been rematerialized with new data.
    """
    versions: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> str:
        if name in versions:
            return versions[name]
        if name in path:
            raise DvcGraphError(f"dependency cycle between stages: {' -> '.join((*path, name))}")
        group = pipeline.groups[name]
        digest = hashlib.sha256(group_code_version(pipeline.root, group).encode())
        for upstream in group.upstream_groups:
            digest.update(f";{upstream}={visit(upstream, (*path, name))}".encode())
        versions[name] = digest.hexdigest()[:16]
        return versions[name]

    for name in pipeline.groups:
        visit(name, ())
    return versions


def read_lock(root: Path, lockfile: str) -> dict[str, Any]:
    """The ``stages`` of a dvc.lock ({} when there is none). Parsed once per version of the file (its size,
    mtime and inode), so the sensor's many lookups per tick cost one parse; callers get their own copy."""
    path = root / lockfile
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    return copy.deepcopy(_parse_lock(str(path), (stat.st_size, stat.st_mtime_ns, stat.st_ino)))


@functools.lru_cache(maxsize=16)
def _parse_lock(path: str, version: tuple[int, int, int]) -> dict[str, Any]:
    return (yaml.safe_load(Path(path).read_text()) or {}).get("stages", {}) or {}


def locked_outs(root: Path, item: StageItem) -> list[dict[str, Any]]:
    """The outs recorded for ``item`` in its dvc.lock ([] if it never ran)."""
    return list(read_lock(root, item.lockfile).get(item.lock_key, {}).get("outs", []) or [])


def data_version(root: Path, items: Iterable[StageItem]) -> str | None:
    """Hash of the items' outs in dvc.lock (path + content hash), or None if one of them is not locked."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.address):
        entry = read_lock(root, item.lockfile).get(item.lock_key)
        if not entry:
            return None
        outs = entry.get("outs") or []
        if not outs:  # a stage without outs: its locked deps and params stand for its result
            digest.update(f"{item.address}:{json.dumps(entry, sort_keys=True, default=str)};".encode())
        for out in sorted(outs, key=lambda o: o["path"]):
            content = out.get("md5") or out.get("hash") or out.get("etag") or out.get("checksum") or ""
            digest.update(f"{item.address}:{out['path']}={content};".encode())
    return digest.hexdigest()[:16]
