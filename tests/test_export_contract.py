"""The ONNX export contract (README "ONNX export contract"), checked with onnxruntime and numpy only.

The export is the real ``onnx_export`` stage's output on tiny untrained upstream artifacts (``tiny_export``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from components.runtime import export_contract as contract
from components.runtime.export_contract import ExportNotFoundError, load_manifest

ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)"}


@pytest.fixture(scope="module")
def export(tiny_export: Path) -> Path:
    return tiny_export / "data" / "onnx_export"


@pytest.fixture(scope="module")
def manifest(export: Path) -> dict:
    return json.loads((export / contract.MANIFEST_FILE).read_text())


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def feed_for(graph: str, manifest: dict, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    sizes = contract.axis_sizes(manifest)
    feed = {}
    for name, dtype, axes in contract.GRAPHS[graph]["inputs"]:
        shape = (batch, *(sizes[a] for a in axes[1:]))
        if dtype == "int64":
            feed[name] = rng.integers(0, len(manifest["actions"]), shape).astype(np.int64)
        elif name == "frames":
            feed[name] = rng.random(shape, dtype=np.float32)
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    return feed


@pytest.mark.parametrize("graph", list(contract.GRAPHS))
def test_graph_names_dtypes_and_shapes(export: Path, manifest: dict, graph: str) -> None:
    sizes = contract.axis_sizes(manifest)
    s = session(export / graph)
    for declared, actual in ((contract.GRAPHS[graph]["inputs"], s.get_inputs()),
                             (contract.GRAPHS[graph]["outputs"], s.get_outputs())):
        assert [a.name for a in actual] == [name for name, _, _ in declared]
        for (name, dtype, axes), node in zip(declared, actual, strict=True):
            assert node.type == ORT_TYPES[dtype], name
            assert isinstance(node.shape[0], str), f"{graph} {name}: batch axis must be dynamic, got {node.shape}"
            assert node.shape[1:] == [sizes[a] for a in axes[1:]], f"{graph} {name}: {node.shape}"


@pytest.mark.parametrize("graph", list(contract.GRAPHS))
def test_dynamic_batch_of_1_and_3(export: Path, manifest: dict, graph: str) -> None:
    sizes = contract.axis_sizes(manifest)
    s = session(export / graph)
    rng = np.random.default_rng(0)
    feed = feed_for(graph, manifest, 3, rng)
    three = s.run(None, feed)[0]
    (_, dtype, axes), = contract.GRAPHS[graph]["outputs"]
    assert three.shape == (3, *(sizes[a] for a in axes[1:])) and three.dtype == np.dtype(dtype)
    assert np.isfinite(three).all()
    # each sample of the batch is computed independently: batch 1 gives the same rows
    for row in range(3):
        one = s.run(None, {k: v[row : row + 1] for k, v in feed.items()})[0]
        assert one.shape[0] == 1
        np.testing.assert_allclose(one[0], three[row], atol=1e-4)


def test_decoder_frames_in_unit_range_at_recorded_size(export: Path, manifest: dict) -> None:
    frames = session(export / contract.DECODER_FILE).run(
        None, feed_for(contract.DECODER_FILE, manifest, 2, np.random.default_rng(1)))[0]
    assert frames.shape == (2, 3, manifest["H"], manifest["W"])
    assert frames.min() >= 0.0 and frames.max() <= 1.0


def test_world_model_uses_actions_and_context(export: Path, manifest: dict) -> None:
    s = session(export / contract.WORLD_MODEL_FILE)
    feed = feed_for(contract.WORLD_MODEL_FILE, manifest, 1, np.random.default_rng(2))
    base = s.run(None, feed)[0]
    other_action = dict(feed, context_actions=(feed["context_actions"] + 1) % len(manifest["actions"]))
    other_context = dict(feed, context_latents=feed["context_latents"] * 0.5)
    assert np.abs(s.run(None, other_action)[0] - base).max() > 0
    assert np.abs(s.run(None, other_context)[0] - base).max() > 0
    np.testing.assert_array_equal(s.run(None, feed)[0], base)  # deterministic: noise is built in


def test_manifest_fields(export: Path, manifest: dict, tiny_export: Path) -> None:
    assert load_manifest(export) == manifest
    for field, (kind, _) in contract.MANIFEST_FIELDS.items():
        assert isinstance(manifest[field], kind), field
    assert manifest["format_version"] == contract.FORMAT_VERSION == 1
    params = yaml.safe_load((tiny_export / "params.yaml").read_text())
    assert manifest["actions"] == [{"id": i, "name": a["name"], "buttons": a["buttons"]}
                                   for i, a in enumerate(params["environment"]["actions"])]
    assert manifest["frame_skip"] == params["environment"]["frame_skip"]
    assert [manifest["W"], manifest["H"]] == list(params["environment"]["resolution"])
    assert set(manifest["scenario"]) >= {"cfg", "wad", "map"} and manifest["scenario"]["cfg"].endswith(".cfg")
    assert len(manifest["params_hash"]) == 64
    assert set(manifest["sampling"]) >= {"teacher_steps", "cfg", "context_noise_level"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((export / name).read_bytes()).hexdigest() == digest, name
    assert set(manifest["files"]) == set(contract.EXPORT_FILES) - {contract.MANIFEST_FILE}


def test_graphs_are_single_files(export: Path) -> None:
    assert sorted(p.name for p in export.iterdir()) == sorted(contract.EXPORT_FILES)


def test_contexts_npz(export: Path, manifest: dict) -> None:
    sizes = contract.axis_sizes(manifest)
    with np.load(export / contract.CONTEXTS_FILE) as data:
        arrays = {k: data[k] for k in data.files}
    assert set(arrays) == set(contract.CONTEXT_ARRAYS)
    n, t = len(arrays["context_latents"]), arrays["future_actions"].shape[1]
    assert n == manifest["contexts"]["count"] >= 1
    for name, (dtype, axes) in contract.CONTEXT_ARRAYS.items():
        expected = tuple({"N": n, "T": t}.get(a, sizes.get(a)) for a in axes)
        assert arrays[name].shape == expected and arrays[name].dtype == np.dtype(dtype), name
    assert arrays["context_actions"].max() < len(manifest["actions"])
    # the shipped latents are the encoder's latents of the shipped frames
    encoder = session(export / contract.ENCODER_FILE)
    frames = arrays["context_frames"][0].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    np.testing.assert_allclose(encoder.run(None, {"frames": frames})[0], arrays["context_latents"][0], atol=1e-3)


def test_parity_report_is_a_passing_asset_check(tiny_export: Path, manifest: dict) -> None:
    report = json.loads((tiny_export / "reports" / "onnx_export.json").read_text())
    assert report["success"] is True
    names = {c["name"] for c in report["checks"]}
    for graph in contract.GRAPHS:
        assert {f"parity:{graph}", f"onnx_checker:{graph}", f"dynamic_batch:{graph}:1",
                f"dynamic_batch:{graph}:3"} <= names
        check = next(c for c in report["checks"] if c["name"] == f"parity:{graph}")
        assert 0 <= check["max_abs_diff"] <= check["tolerance"] and check["samples"] >= 1
        assert manifest["parity"][graph]["max_abs_diff"] == check["max_abs_diff"]


def test_load_manifest_rejects_incomplete_folders(export: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportNotFoundError, match="no such folder"):
        load_manifest(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportNotFoundError, match="not an ONNX export, missing"):
        load_manifest(empty)
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    data = json.loads((copy / contract.MANIFEST_FILE).read_text())
    data["format_version"] = 99
    (copy / contract.MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ExportNotFoundError, match="format_version 99"):
        load_manifest(copy)
    del data["actions"]
    (copy / contract.MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ExportNotFoundError, match="missing fields"):
        load_manifest(copy)


@pytest.mark.slow
def test_dvc_pipeline_builds_a_valid_export(micro_pipeline: Path) -> None:
    """`dvc repro` on the micro profile: the export passes its checks and records the dvc.lock hashes."""
    export = micro_pipeline / "data" / "onnx_export"
    manifest = load_manifest(export)
    for name in ("data/distilled_model", "data/validated_latents", "data/raw_trajectories"):
        assert manifest["inputs"][name], name
    assert "data/distilled_model/autoencoder" not in manifest["inputs"]  # part of data/distilled_model
    assert manifest["contexts"]["frames_source"] == "raw_trajectories"
    assert json.loads((micro_pipeline / "reports" / "onnx_export.json").read_text())["success"] is True
    metrics = json.loads((micro_pipeline / "metrics" / "distilled_model.json").read_text())
    assert {"student_psnr", "teacher_psnr", "student_vs_teacher_psnr"} <= set(metrics)
    lock = yaml.safe_load((micro_pipeline / "dvc.lock").read_text())
    assert {"distilled_model", "onnx_export"} <= set(lock["stages"])
