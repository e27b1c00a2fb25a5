"""``python -m orchestration.ui`` (what ``make ui`` runs): ``dagster dev`` on 127.0.0.1 for this project.

- ``DAGSTER_HOME`` is project-local (``dagster_home/``, git-ignored); ``orchestration/dagster.yaml`` (telemetry
  off, the ``dvc`` pool limit) is copied into it on every start.
- ``dagster dev`` runs in its own process group. Ctrl-C (SIGINT) and SIGTERM are forwarded to that group,
  which makes dagster dev stop its webserver, daemon and code servers; whatever is still alive after
  ``--grace`` seconds is killed. Nothing is left running.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from orchestration.settings import PROJECT_DIR_ENV, project_dir

INSTANCE_YAML = Path(__file__).resolve().parent / "dagster.yaml"


def prepare_home(home: Path) -> Path:
    """Create ``home`` and install the project's instance config in it."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(INSTANCE_YAML, home / "dagster.yaml")
    return home


def dev_command(host: str, port: int) -> list[str]:
    dagster = Path(sys.executable).parent / "dagster"
    return [str(dagster) if dagster.exists() else "dagster", "dev", "-m", "orchestration.definitions",
            "-h", host, "-p", str(port)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--project", type=Path, default=None, help="DVC project (default: this repository)")
    parser.add_argument("--home", type=Path, default=None, help="DAGSTER_HOME (default: <project>/dagster_home)")
    parser.add_argument("--grace", type=float, default=20.0, help="seconds to wait for a clean stop")
    args = parser.parse_args(argv)

    root = (args.project or project_dir()).resolve()
    home = prepare_home((args.home or root / "dagster_home").resolve())
    env = dict(os.environ)
    env.update(DAGSTER_HOME=str(home), DAGSTER_DISABLE_TELEMETRY="1", DVC_NO_ANALYTICS="1")
    env[PROJECT_DIR_ENV] = str(root)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    print(f"dagster dev: http://{args.host}:{args.port}  (project {root}, DAGSTER_HOME {home})", flush=True)
    child = subprocess.Popen(dev_command(args.host, args.port), cwd=root, env=env, start_new_session=True)

    stopping: dict[str, int | None] = {"signal": None}

    def forward(signum: int, _frame: object) -> None:
        stopping["signal"] = signum
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    while child.poll() is None:
        if stopping["signal"] is not None:
            deadline = time.monotonic() + args.grace
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            break
        time.sleep(0.2)
    # Anything left in dagster dev's group (webserver, daemon, code servers) is stopped, then killed.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(0.5 if sig == signal.SIGTERM else 0)
    child.wait()
    return 0 if stopping["signal"] is not None else (child.returncode or 0)


if __name__ == "__main__":
    sys.exit(main())
