"""Materialization metadata read from a stage's outputs: sizes, metrics values and image previews.

Conventions (every stage, no per-stage code): metrics files are the stage's dvc.yaml `metrics` (JSON or YAML);
previews are the PNG files (GIF and JPEG too) the stage lists under `plots` (a file, or a folder such as
`plots/<stage>/`), shown in the UI as markdown images.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from orchestration.dvc_graph import StageItem

# Images larger than this are linked by path instead of being embedded in the event log.
MAX_EMBEDDED_IMAGE_BYTES = 400_000
MAX_PREVIEWS = 4
MAX_METRIC_VALUES = 40


def _size(path: Path) -> tuple[int, int]:
    """(bytes, files) of a file or a folder."""
    if path.is_file():
        return path.stat().st_size, 1
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return sum(p.stat().st_size for p in files), len(files)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, sub in value.items():
            flat.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def workspace_text(root: Path) -> Callable[[str], str | None]:
    """Reads a repo-relative file of the workspace (None when it is not there)."""
    return lambda relpath: (root / relpath).read_text() if (root / relpath).is_file() else None


def read_metrics(root: Path, metrics_files: list[str],
                 read: Callable[[str], str | None] | None = None) -> dict[str, Any]:
    """``{"<file>:<dotted.key>": value}`` for the numbers, bools and short strings in the metrics files, as
    ``read`` gives their text (default: the workspace's files)."""
    read = read or workspace_text(root)
    values: dict[str, Any] = {}
    for relpath in metrics_files:
        text = read(relpath)
        if text is None:
            continue
        try:
            data = json.loads(text) if relpath.endswith(".json") else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError):
            continue
        for key, value in flatten(data).items():
            if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) < 200):
                values[f"{relpath}:{key}"] = value
    return values


IMAGE_TYPES = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def preview_images(root: Path, plots: list[str]) -> list[Path]:
    """The images among the stage's plots (files, or files inside plot folders): PNGs first, and the training
    curves (``curve_*``, ``components/images.py``) after the stage's own pictures."""
    images: list[Path] = []
    for relpath in plots:
        path = root / relpath
        if path.is_file() and path.suffix.lower() in IMAGE_TYPES:
            images.append(path)
        elif path.is_dir():
            images.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_TYPES))
    return sorted(images, key=lambda p: (p.suffix.lower() != ".png", p.name.startswith("curve_")))


def image_markdown(root: Path, image: Path) -> str:
    relpath = image.relative_to(root).as_posix()
    data = image.read_bytes()
    if len(data) > MAX_EMBEDDED_IMAGE_BYTES:
        return f"**{relpath}** ({len(data)} bytes, too large to embed; open it from the workspace)"
    encoded = base64.b64encode(data).decode()
    return f"**{relpath}**\n\n![{relpath}](data:{IMAGE_TYPES[image.suffix.lower()]};base64,{encoded})"


def stage_metadata(root: Path, items: list[StageItem]) -> dict[str, Any]:
    """Metadata for a materialization of ``items`` (one item, or the partitions of one run)."""
    metadata: dict[str, Any] = {}
    total_bytes = total_files = 0
    rows = []
    for item in items:
        for out in item.outs:
            size, files = _size(root / out)
            total_bytes += size
            total_files += files
            rows.append(f"| `{out}` | {size:,} | {files} |")
    metadata["output bytes"] = dg.MetadataValue.int(total_bytes)
    metadata["output files"] = dg.MetadataValue.int(total_files)
    metadata["outputs"] = dg.MetadataValue.md("| out | bytes | files |\n| --- | ---: | ---: |\n" + "\n".join(rows))
    metrics = read_metrics(root, [m for item in items for m in item.metrics])
    for key, value in list(metrics.items())[:MAX_METRIC_VALUES]:
        metadata[f"metric {key}"] = value if not isinstance(value, str) else dg.MetadataValue.text(value)
    images = preview_images(root, [p for item in items for p in item.plots])
    for index, image in enumerate(images[:MAX_PREVIEWS]):
        name = "preview" if index == 0 else f"preview {index + 1}"
        metadata[name] = dg.MetadataValue.md(image_markdown(root, image))
    if len(images) > MAX_PREVIEWS:
        metadata["more previews"] = dg.MetadataValue.text(
            ", ".join(p.relative_to(root).as_posix() for p in images[MAX_PREVIEWS:])
        )
    return metadata
