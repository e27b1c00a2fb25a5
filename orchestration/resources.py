"""``DvcResource``: runs DVC commands in the project as subprocesses and streams their output to the run log.

Every command runs with analytics off, in the project root, in its own process group (so stopping the Dagster
run stops DVC and the stage it runs). A non-zero exit raises ``dagster.Failure`` whose description is DVC's
own ``ERROR:`` text plus the tail of the output, not just an exit code.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dagster as dg

from orchestration.dvc_graph import StageItem, locked_outs
from orchestration.settings import project_dir

# Lines that look like progress bars are logged at most this often (seconds), so tqdm does not flood the log.
_PROGRESS_INTERVAL_S = 5.0
_TAIL_LINES = 40


@dataclass
class CommandResult:
    returncode: int
    output: str  # the whole output (stdout and stderr interleaved)


def _is_progress(line: str) -> bool:
    return "%|" in line or line.rstrip().endswith("it/s]") or line.rstrip().endswith("s/it]")


def dvc_error_text(output: str, context_lines: int = 12) -> str:
    """DVC's own error (``ERROR: ...`` and what follows) with the output just before it, where the stage
    printed its own message (e.g. ``error: latent validation failed ...``); the last lines if DVC printed none."""
    lines = output.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("ERROR"):
            before = [b for b in lines[max(0, index - context_lines) : index] if not _is_progress(b)]
            return "\n".join([*before, *lines[index:]]).strip()
    return "\n".join(lines[-_TAIL_LINES:]).strip()


class DvcResource(dg.ConfigurableResource):
    """The DVC project the assets belong to (default: ``settings.project_dir()``)."""

    project_dir: str = ""
    # Passed as `--wait-for-lock` so a DVC command started outside Dagster makes a step wait, not fail.
    wait_for_lock: bool = True

    @property
    def root(self) -> Path:
        return Path(self.project_dir).resolve() if self.project_dir else project_dir()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["DVC_NO_ANALYTICS"] = "1"
        # The interpreter running Dagster also runs `python` in stage commands (its venv first on PATH).
        bin_dir = str(Path(sys.executable).parent)
        if not env.get("PATH", "").startswith(bin_dir):
            env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def dvc_command(self, *args: str) -> list[str]:
        dvc = Path(sys.executable).parent / "dvc"
        flags = ["--wait-for-lock"] if self.wait_for_lock else []
        return [str(dvc) if dvc.exists() else "dvc", *flags, *args]

    def check_params(self, command: str, log: logging.Logger, overrides: tuple[str, ...] = ()) -> None:
        """The project's params check (``orchestration.check_command``, with ``-S`` for each override) before DVC
        touches the workspace: a wrong value fails the step here, naming the key, and every output stays."""
        if not command.strip():
            return
        cmd = [*shlex.split(command), *(arg for item in overrides for arg in ("-S", item))]
        log.info(f"$ {' '.join(cmd)}  (in {self.root})")
        try:
            done = subprocess.run(cmd, cwd=self.root, env=self.env(), capture_output=True, text=True)
        except OSError as error:
            raise dg.Failure(description=f"params check `{command}` could not start ({error}); fix "
                             "orchestration.check_command in params.yaml ('' turns the check off)") from None
        if done.returncode != 0:
            raise dg.Failure(
                description=f"params check failed (exit {done.returncode}); nothing was run and no output was "
                f"touched:\n{(done.stderr or done.stdout).strip()}",
                metadata={"command": dg.MetadataValue.text(" ".join(cmd)), "exit code": done.returncode},
            )

    def run(self, args: list[str], log: logging.Logger, check: bool = True, what: str | None = None) -> CommandResult:
        """Run ``dvc <args>``, streaming each output line to ``log.info`` as it comes."""
        cmd = self.dvc_command(*args)
        log.info(f"$ dvc {' '.join(cmd[1:])}  (in {self.root})")
        output: list[str] = []
        tail: deque[str] = deque(maxlen=_TAIL_LINES)
        last_progress = 0.0
        process = subprocess.Popen(
            cmd, cwd=self.root, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            for raw in process.stdout:  # universal newlines: tqdm's '\r' updates arrive as lines
                line = raw.rstrip("\n")
                if not line.strip():
                    continue
                output.append(line)
                tail.append(line)
                if _is_progress(line):
                    now = time.monotonic()
                    if now - last_progress < _PROGRESS_INTERVAL_S:
                        continue
                    last_progress = now
                log.info(line)
            returncode = process.wait()
        except BaseException:
            # Run cancelled or the process is stopping: stop DVC and the stage command with it.
            _stop_group(process)
            raise
        result = CommandResult(returncode, "\n".join(output))
        if check and returncode != 0:
            error = dvc_error_text(result.output)
            raise dg.Failure(
                description=f"{what or 'dvc ' + ' '.join(args)} failed (exit {returncode}):\n{error}",
                metadata={
                    "command": dg.MetadataValue.text(" ".join(cmd)),
                    "exit code": returncode,
                    "output (tail)": dg.MetadataValue.md("```\n" + "\n".join(tail) + "\n```"),
                },
            )
        return result

    def repro(self, address: str, log: logging.Logger, pull: bool = False) -> CommandResult:
        """``dvc repro --single-item <address>``: runs (or restores from the run-cache) exactly one stage."""
        args = ["repro", "--single-item"]
        if pull:
            args.append("--pull")
        return self.run([*args, address], log, what=f"dvc repro of stage {address!r}")

    def remote_url(self) -> str | None:
        """URL of the default DVC remote (local paths resolved), or None when none is configured."""
        from dvc.repo import Repo

        with Repo(str(self.root)) as repo:
            name = repo.config["core"].get("remote")
            if not name:
                return None
            return repo.config["remote"].get(name, {}).get("url")

    def remote_reachable(self) -> tuple[bool, str]:
        """(usable, why). A local remote is usable when its parent folder exists (the folder is created)."""
        url = self.remote_url()
        if not url:
            return False, "no default DVC remote configured (`dvc remote add -d ...`)"
        scheme = urlparse(url).scheme
        if scheme in ("", "file") or len(scheme) == 1:  # plain path (or a Windows drive letter)
            path = Path(urlparse(url).path if scheme == "file" else url)
            if not path.parent.is_dir():
                return False, f"local remote {path} is not reachable (its parent folder does not exist)"
            path.mkdir(exist_ok=True)
            return True, f"local remote {path}"
        return True, f"remote {url}"

    def push(self, items: list[StageItem], log: logging.Logger, required: bool = False) -> bool:
        """Push the items' outs and the run-cache to the default remote, when one is reachable.

        ``dvc push --run-cache`` sends the cached outs and the run-cache entries, but not the objects of
        ``cache: false`` outs (metrics, plots), without which another checkout cannot restore the
        stage from the run-cache; ``_push_uncached`` sends those. Returns whether everything was pushed.
        """
        usable, why = self.remote_reachable()
        if not usable:
            log.warning(f"not pushing to a DVC remote: {why}")
            return False
        targets = [item.address for item in items]
        result = self.run(["push", "--run-cache", *targets], log, check=required, what=f"dvc push to {why}")
        if result.returncode != 0:
            log.warning(f"dvc push to {why} failed; outputs stay local:\n{dvc_error_text(result.output)}")
            return False
        missing = self._push_uncached(items, log)
        if missing and required:
            raise dg.Failure(description=f"could not push the cache: false outs {missing} to {why}")
        return not missing

    def _push_uncached(self, items: list[StageItem], log: logging.Logger) -> list[str]:
        """Copy the cache objects of the items' ``cache: false`` outs to the remote; returns those missing."""
        from dvc.repo import Repo
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.transfer import transfer
        from dvc_data.hashfile.tree import Tree

        wanted: dict[str, Any] = {}
        for item in items:
            for out in locked_outs(self.root, item):
                if out["path"] in item.uncached_outs and out.get("md5"):
                    wanted[out["path"]] = HashInfo("md5", out["md5"])
        if not wanted:
            return []
        missing: list[str] = []
        with Repo(str(self.root)) as repo:
            local = repo.cache.local
            objects = set()
            for path, hash_info in wanted.items():
                if not local.exists(hash_info.value):
                    missing.append(path)  # not in the local cache (the run-cache stores it when a stage runs)
                    continue
                objects.add(hash_info)
                if hash_info.isdir:
                    objects.update(entry for _, _, entry in Tree.load(local, hash_info))
            result = transfer(local, repo.cloud.get_remote_odb(None, "push"), objects)
        missing += [str(h) for h in result.failed]
        log.info(f"pushed {len(result.transferred)} object(s) of cache: false outs {sorted(wanted)}")
        if missing:
            log.warning(f"not in the local cache, not pushed: {missing}")
        return missing


def _stop_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
