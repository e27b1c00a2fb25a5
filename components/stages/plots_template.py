"""Command ``plots_template``: DVC's plots page with vega, vega-lite and vega-embed inlined, for offline use.

``dvc plots show`` writes an HTML page that loads vega from a public CDN, so it is blank without the internet.
This command downloads the versions DVC's renderer (``dvc_render``) targets from the npm registry, checks each
tarball against the registry's sha512 integrity hash, and writes ``.dvc/plots/offline.html``: the page template
with the three libraries inlined. ``.dvc/config`` names it (``plots.html_template``), so ``dvc plots show``
renders offline. The template is committed; rerun this only to change the pinned versions.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import logging
import tarfile
import urllib.request
from pathlib import Path

from components.atomic import atomic_write_text
from components.errors import PipelineError

log = logging.getLogger(__name__)

# package -> (version, file in the npm tarball); the versions dvc_render's VegaRenderer.SCRIPTS loads
LIBRARIES = {
    "vega": ("5.20.2", "package/build/vega.min.js"),
    "vega-lite": ("5.2.0", "package/build/vega-lite.min.js"),
    "vega-embed": ("6.18.2", "package/build/vega-embed.min.js"),
}
REGISTRY = "https://registry.npmjs.org"
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined by `python -m components plots_template` ({versions}) -->
    {libraries}
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=".dvc/plots/offline.html", help="template to write")


def fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except OSError as error:  # no network, DNS, HTTP errors: one line, and the committed template stays as it is
        raise PipelineError(f"{url}: cannot download ({error}); "
                            "the committed .dvc/plots/offline.html is unchanged") from None


def library_source(name: str, version: str, member: str) -> str:
    """The minified build of ``name@version`` from its npm tarball, checked against the registry's integrity."""

    meta = json.loads(fetch(f"{REGISTRY}/{name}/{version}"))
    tarball = fetch(meta["dist"]["tarball"])
    algorithm, expected = meta["dist"]["integrity"].split("-", 1)
    if algorithm != "sha512" or base64.b64encode(hashlib.sha512(tarball).digest()).decode() != expected:
        raise PipelineError(f"{name}@{version}: the tarball does not match the registry's integrity hash")
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        handle = archive.extractfile(member)
        if handle is None:
            raise PipelineError(f"{name}@{version}: {member} is not in the npm tarball")
        return handle.read().decode("utf8")


def main(args: argparse.Namespace) -> None:
    scripts, versions = [], []
    for name, (version, member) in LIBRARIES.items():
        source = library_source(name, version, member).replace("</script", "<\\/script")  # stays inside its tag
        scripts.append(f"<script>/* {name}@{version} */\n{source}\n</script>")
        versions.append(f"{name}@{version}")
        log.info("inlined %s@%s (%d kB)", name, version, len(source) // 1000)
    page = PAGE.replace("{versions}", ", ".join(versions)).replace("{libraries}", "\n    ".join(scripts))
    atomic_write_text(Path(args.out), page)
    log.info("wrote %s; dvc plots show uses it through .dvc/config (plots.html_template)", args.out)
