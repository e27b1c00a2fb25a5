"""Seconds per tick of the Dagster sensor ``dvc_lock_sync`` on a DVC project that has run (default: this checkout).

The first tick records every stage of dvc.lock; the steady ticks find the event log in step and record nothing,
which is what the daemon repeats every 30 s while ``make ui`` runs. Prints JSON.

    python benchmarks/lock_sync_tick.py [PROJECT] [--ticks 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project", nargs="?", default=".", help="a DVC project with a dvc.lock (default: here)")
    parser.add_argument("--ticks", type=int, default=3, help="steady ticks to time (default 3)")
    args = parser.parse_args()
    if not (Path(args.project) / "dvc.lock").is_file():
        parser.error(f"{args.project}: no dvc.lock; run the pipeline there first (make run)")
    sys.path.insert(0, str(REPO))
    import dagster as dg

    from orchestration.lock_sync import record_from_lock

    instance = dg.DagsterInstance.ephemeral()
    started = time.perf_counter()
    recorded = record_from_lock(instance, Path(args.project))
    first = time.perf_counter() - started
    steady = []
    for _ in range(args.ticks):
        started = time.perf_counter()
        record_from_lock(instance, Path(args.project))
        steady.append(round(time.perf_counter() - started, 3))
    print(json.dumps({"project": str(Path(args.project).resolve()), "stages_recorded": len(recorded),
                      "first_tick_s": round(first, 3), "steady_tick_s": steady}, indent=2))


if __name__ == "__main__":
    main()
