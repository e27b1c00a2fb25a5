"""Champion/challenger promotion, both ways, including a challenger exactly equal to the champion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from components.evaluation import promotion
from tests.fixtures.processes import REPO_ROOT

CRITERIA = [
    promotion.Criterion("onnx.teacher_forced.psnr.model.pooled", tolerance=0.1),
    promotion.Criterion("onnx.teacher_forced.controllability.turning.share", tolerance=0.05),
    promotion.Criterion("fvd", tolerance=1.0, higher_is_better=False),
]


def metrics(psnr: float, control: float = 0.8, fvd: float = 100.0) -> dict:
    return {
        "onnx": {"teacher_forced": {"psnr": {"model": {"pooled": psnr}},
                                    "controllability": {"turning": {"share": control}}}},
        "fvd": fvd,
    }


def make_export(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "world_model.onnx").write_bytes(content)
    (folder / "manifest.json").write_text(json.dumps({"K": 4}))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_decide_both_ways_and_exactly_equal() -> None:
    champion = metrics(25.0)
    assert promotion.decide(metrics(25.5), champion, CRITERIA).promoted
    assert promotion.decide(metrics(25.0), champion, CRITERIA).promoted  # exactly equal is no worse
    assert promotion.decide(metrics(24.95), champion, CRITERIA).promoted  # within the 0.1 dB tolerance
    worse = promotion.decide(metrics(24.8), champion, CRITERIA)
    assert not worse.promoted and "onnx.teacher_forced.psnr.model.pooled" in worse.reason
    assert not promotion.decide(metrics(26.0, control=0.7), champion, CRITERIA).promoted  # better PSNR, worse control
    assert not promotion.decide(metrics(25.0, fvd=102.0), champion, CRITERIA).promoted  # lower is better for FVD
    assert promotion.decide(metrics(25.0, fvd=99.0), champion, CRITERIA).promoted
    missing = promotion.decide({"fvd": 1.0}, champion, CRITERIA)
    assert not missing.promoted and "challenger has no value" in missing.reason
    nan = promotion.decide(metrics(float("nan")), champion, CRITERIA)
    assert not nan.promoted
    assert promotion.decide(metrics(1.0), None, CRITERIA).reason == "first champion"
    with pytest.raises(promotion.PromotionError):
        promotion.decide(metrics(1.0), champion, [])


def test_promotion_installs_then_rejects_without_touching_the_champion(tmp_path: Path) -> None:
    champion_dir, log = tmp_path / "artifacts" / "champion", tmp_path / "docs" / "promotion-log.md"
    first = make_export(tmp_path / "run1", b"weights-1")
    decision = promotion.promote(first, metrics(25.0), champion_dir, CRITERIA, log, source="run1")
    assert decision.promoted and decision.reason == "first champion"
    assert (champion_dir / "export" / "world_model.onnx").read_bytes() == b"weights-1"
    assert json.loads((champion_dir / "metrics.json").read_text()) == metrics(25.0)
    info = json.loads((champion_dir / "champion.json").read_text())
    assert info["source"] == "run1" and set(info["files"]) == {"world_model.onnx", "manifest.json"}

    before = snapshot(champion_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in champion_dir.rglob("*")}
    worse = make_export(tmp_path / "run2", b"weights-2")
    decision = promotion.promote(worse, metrics(24.0), champion_dir, CRITERIA, log, source="run2")
    assert not decision.promoted
    assert snapshot(champion_dir) == before  # byte for byte
    assert {p: p.stat().st_mtime_ns for p in champion_dir.rglob("*")} == mtimes  # not even rewritten

    equal = make_export(tmp_path / "run3", b"weights-3")
    decision = promotion.promote(equal, metrics(25.0), champion_dir, CRITERIA, log, source="run3")
    assert decision.promoted
    assert (champion_dir / "export" / "world_model.onnx").read_bytes() == b"weights-3"

    text = log.read_text()
    assert text.count("PROMOTED") == 2 and text.count("REJECTED") == 1 and "run2" in text
    records = [json.loads(line) for line in log.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["promoted"] for r in records] == [True, False, True]
    assert records[1]["champion_metrics"] == metrics(25.0) and records[1]["challenger_metrics"] == metrics(24.0)
    assert not list(champion_dir.parent.glob(".*tmp")) and not list(champion_dir.parent.glob(".*old"))


def test_champion_metrics_override_is_what_gets_compared(tmp_path: Path) -> None:
    champion_dir = tmp_path / "champion"
    promotion.promote(make_export(tmp_path / "a", b"a"), metrics(20.0), champion_dir, CRITERIA, None)
    # re-evaluated on the challenger's held-out episodes the champion scores 30 dB: the challenger loses
    decision = promotion.promote(make_export(tmp_path / "b", b"b"), metrics(25.0), champion_dir, CRITERIA, None,
                                 champion_metrics=metrics(30.0))
    assert not decision.promoted
    compared = decision.report()["checks"][0]
    assert compared["name"] == "onnx.teacher_forced.psnr.model.pooled" and compared["champion"] == 30.0


def test_missing_export_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(promotion.PromotionError, match="no challenger export"):
        promotion.promote(tmp_path / "nope", metrics(1.0), tmp_path / "champion", CRITERIA, None)


def test_params_refuse_a_criterion_on_a_rollout_that_is_not_measured() -> None:
    from components.params import ParamsError, parse_params, read_yaml
    from tests.fixtures.processes import REPO_ROOT

    raw = read_yaml(REPO_ROOT / "params.yaml")
    raw["evaluation"]["rollout_lengths"] = [4, 8]
    with pytest.raises(ParamsError, match=r"evaluation\.promotion: criteria metric 'onnx\.rollout\.16\.mean_psnr"):
        parse_params(raw)
    raw["evaluation"]["promotion"] = {"criteria": [{"metric": "onnx.rollout.8.mean_psnr_over_steps.model"}]}
    assert parse_params(raw).evaluation.promotion.criteria[0].tolerance == 0.0


def test_a_promotion_killed_during_the_copy_leaves_the_champion_byte_for_byte(tmp_path: Path) -> None:
    champion_dir = tmp_path / "artifacts" / "champion"
    promotion.promote(make_export(tmp_path / "run1", b"weights-1"), metrics(25.0), champion_dir, CRITERIA, None)
    before = snapshot(champion_dir)
    big = make_export(tmp_path / "run2", b"")
    with open(big / "world_model.onnx", "wb") as handle:  # large enough that the copy takes a while
        for _ in range(384):
            handle.write(os.urandom(1 << 20))
    script = ("import sys; from pathlib import Path; from components.evaluation import promotion; "
              "from tests.test_promotion import CRITERIA, metrics; "
              "promotion.promote(Path(sys.argv[1]), metrics(30.0), Path(sys.argv[2]), CRITERIA, None)")
    process = subprocess.Popen([sys.executable, "-c", script, str(big), str(champion_dir)], cwd=REPO_ROOT)
    deadline = time.monotonic() + 60
    staging = []
    while not staging and process.poll() is None and time.monotonic() < deadline:
        staging = [p for p in champion_dir.parent.glob(".champion.*.tmp") if list(p.rglob("*.onnx"))]
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert staging, "the promotion ended before the copy could be interrupted"
    assert snapshot(champion_dir) == before  # the previous champion, byte for byte
    # the next promotion finishes the job; the leftover staging folder of the killed one is only litter
    decision = promotion.promote(make_export(tmp_path / "run3", b"weights-3"), metrics(30.0), champion_dir, CRITERIA,
                                 None)
    assert decision.promoted and (champion_dir / "export" / "world_model.onnx").read_bytes() == b"weights-3"
