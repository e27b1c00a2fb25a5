"""The Dagster UI as a user starts it (``python -m orchestration.ui``, what ``make ui`` runs), on the toy project
after a ``dvc repro`` run by hand: GraphQL lists the assets and their deps, the dvc.lock sensor shows every stage as
materialized with dvc.lock's data version and the validation check with its status, headless Chromium shows them
on the asset graph, and a SIGTERM stops every process it started."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from test_orchestration import asset_graph_edges, lock_data_version, make_toy_repo

from orchestration.builder import build_definitions
from tests.fixtures.browser import chromium_page
from tests.fixtures.processes import pipeline_env, run

GRAPHQL_ASSETS = "{ assetNodes { assetKey { path } dependencyKeys { path } isPartitioned } }"
GRAPHQL_MATERIALIZED = """{ assetNodes { assetKey { path }
    assetMaterializations(limit: 1) { tags { key value } }
    assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization { status } } } } } }"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the UI exited early ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"no answer from {url} in {timeout} s:\n{log.read_text()[-3000:]}")


def graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(processes: list[psutil.Process]) -> list[str]:
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


def start_ui(repo: Path, tmp_path: Path) -> tuple[str, subprocess.Popen, Path]:
    """``python -m orchestration.ui`` on ``repo`` (what ``make ui`` runs): its URL, launcher process and log."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    command = [sys.executable, "-m", "orchestration.ui", "--project", str(repo), "--home", str(tmp_path / "home"),
               "--port", str(port)]  # fmt: skip
    with log.open("w") as out:
        launcher = subprocess.Popen(
            command, cwd=repo, env=pipeline_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return url, launcher, log


def stop_ui(launcher: subprocess.Popen) -> None:
    launcher.send_signal(signal.SIGTERM)
    try:
        launcher.wait(timeout=60)
    except subprocess.TimeoutExpired:
        launcher.kill()


def wait_until_materialized(url: str, nodes: set[str], log: Path, timeout: float = 180) -> dict[str, dict]:
    """Asset node -> its GraphQL node, once the daemon's dvc.lock sensor has recorded every one of ``nodes``."""
    deadline, materialized = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and set(materialized) != nodes:
        answer = graphql(url, GRAPHQL_MATERIALIZED)
        assert "errors" not in answer, answer
        materialized = {"/".join(n["assetKey"]["path"]): n for n in answer["data"]["assetNodes"]
                        if n["assetMaterializations"]}
        time.sleep(2)
    assert set(materialized) == nodes, f"materialized: {sorted(materialized)}; log: {log.read_text()[-2000:]}"
    return materialized


def dismiss_newsletter_dialog(page, timeout_ms: int = 10_000) -> None:
    """The first-visit "Join the Dagster community" dialog covers the graph; skip it if it comes."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_role("button", name="Skip").first.click(timeout=timeout_ms)
    except PlaywrightTimeout:
        pass


def open_asset_graph(page, url: str, nodes: set[str], screenshot: Path) -> dict[str, int]:
    """The asset graph page with every node drawn, screenshot saved: how often each asset name appears on it
    (once in the sidebar list and once on its node of the graph)."""
    page.goto(f"{url}/asset-groups", wait_until="domcontentloaded", timeout=120_000)
    for name in sorted(nodes):
        page.get_by_text(name, exact=True).first.wait_for(timeout=120_000)
    dismiss_newsletter_dialog(page)
    page.wait_for_timeout(1500)  # let the graph layout settle for the screenshot
    counts = {name: page.get_by_text(name, exact=True).count() for name in nodes}
    page.screenshot(path=str(screenshot), full_page=True)
    return counts


def check_statuses(node: dict) -> dict[str, str | None]:
    return {c["name"]: (c["executionForLatestMaterialization"] or {}).get("status")
            for c in node["assetChecksOrError"]["checks"]}


@pytest.mark.timeout(420)
def test_ui_graphql_browser_and_clean_stop(tmp_path: Path) -> None:
    repo = make_toy_repo(tmp_path / "toy")
    defs = build_definitions(repo)
    nodes, edges = asset_graph_edges(defs)
    run(["dvc", "repro"], repo)  # by hand, as `make run` does: Dagster has not seen it
    url, launcher, log = start_ui(repo, tmp_path)
    seen: list[psutil.Process] = []
    try:
        wait_for_server(url, launcher, log)
        assert (tmp_path / "home" / "dagster.yaml").is_file()  # the project's instance config was installed

        # GraphQL: the asset nodes and their dependencies are those of the toy dvc.yaml.
        answer = graphql(url, GRAPHQL_ASSETS)
        assert "errors" not in answer, answer
        served = answer["data"]["assetNodes"]
        assert {"/".join(n["assetKey"]["path"]) for n in served} == nodes
        key = lambda node: "/".join(node["path"])  # noqa: E731
        served_edges = {(key(d), key(n["assetKey"])) for n in served for d in n["dependencyKeys"]}
        assert served_edges == edges
        assert {"/".join(n["assetKey"]["path"]) for n in served if n["isPartitioned"]} == {"shards"}

        seen = process_tree(launcher.pid)
        assert len(seen) >= 3, "expected the launcher, dagster dev, its webserver and daemon"

        # The daemon's dvc.lock sensor records every stage as materialized, with dvc.lock's data version.
        materialized = wait_until_materialized(url, nodes, log)
        tags = {t["key"]: t["value"] for t in materialized["prepare"]["assetMaterializations"][0]["tags"]}
        assert tags["dagster/data_version"] == lock_data_version(repo, "prepare")
        assert check_statuses(materialized["validate"]) == {"validate": "SUCCEEDED"}

        # The asset graph page in headless Chromium.
        screenshot = tmp_path / "asset_graph.png"
        with chromium_page(1400, 900) as page:
            counts = open_asset_graph(page, url, nodes, screenshot)
            text = page.inner_text("body")

            # The asset page shows the stage's metadata, its PNG plot rendered as an image.
            page.goto(f"{url}/assets/prepare", wait_until="domcontentloaded", timeout=120_000)
            page.get_by_text("preview", exact=True).first.wait_for(timeout=120_000)
            page.wait_for_timeout(1000)
            images = page.eval_on_selector_all("img[src^='data:image/png']", "els => els.map(e => e.naturalWidth)")
            dismiss_newsletter_dialog(page, timeout_ms=1000)
            page.get_by_text("preview", exact=True).first.scroll_into_view_if_needed()
            page.screenshot(path=str(tmp_path / "asset_prepare.png"))
        assert all(name in text for name in nodes), text[:2000]
        assert all(count >= 2 for count in counts.values()), counts
        assert screenshot.stat().st_size > 10_000
        assert images == [16], images  # the 16x16 grid.png preview decoded in the page
        print(f"screenshot: {screenshot}")
    finally:
        seen = seen or process_tree(launcher.pid)
        stop_ui(launcher)
    assert launcher.returncode == 0, log.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive(seen) == [], f"processes left after SIGTERM: {alive(seen)}"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/server_info", timeout=5)


@pytest.mark.timeout(600)
def test_ui_shows_the_micro_pipeline_run_by_hand_materialized_with_its_checks(
        micro_pipeline: Path, tmp_path: Path) -> None:
    """`make ui` after a micro `dvc repro` outside Dagster: every stage asset materialized with dvc.lock's data
    version, the blocking checks (latent gate, export parity, champion) with their status, and the asset graph in
    headless Chromium, screenshot saved beside the test."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(micro_pipeline, repo, symlinks=True)
    nodes, _ = asset_graph_edges(build_definitions(repo))
    url, launcher, log = start_ui(repo, tmp_path)
    try:
        wait_for_server(url, launcher, log)
        materialized = wait_until_materialized(url, nodes, log, timeout=300)
        for name in ("rl_agent", "diffusion_checkpoint", "evaluation", "champion"):
            tags = {t["key"]: t["value"] for t in materialized[name]["assetMaterializations"][0]["tags"]}
            assert tags["dagster/data_version"] == lock_data_version(repo, name), name
        gated = ("validated_latents", "onnx_export", "champion")
        statuses = {name: check_statuses(materialized[name]) for name in gated}
        assert statuses == {name: {name: "SUCCEEDED"} for name in gated}, statuses
        screenshot = tmp_path / "micro_asset_graph.png"
        with chromium_page(1600, 1000) as page:
            counts = open_asset_graph(page, url, nodes, screenshot)
        assert all(count >= 2 for count in counts.values()), counts  # in the sidebar and on the graph
        assert screenshot.stat().st_size > 10_000
        print(f"screenshot: {screenshot}")
    finally:
        stop_ui(launcher)
    assert launcher.returncode == 0, log.read_text()[-3000:]
