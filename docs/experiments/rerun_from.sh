#!/bin/bash
# Rerun part of a finished pipeline with changed params, in a copy of its workspace (how README's "measured and
# not kept" rows were made):
#
#   docs/experiments/rerun_from.sh SOURCE COPY [--keep STAGE]... [KEY=VALUE]...
#
# SOURCE is the workspace of a finished default run (a clone after `make run`), COPY a new folder. The copy gets
# this checkout's components/ and dvc.yaml and the KEY=VALUE params (dotted keys, YAML values); the world model's
# upstream stages (`dvc dag diffusion_checkpoint`) and every --keep STAGE (e.g. --keep diffusion_checkpoint to reuse
# the teacher) are taken as they are (`dvc commit -f`), so `python -m components repro evaluation` reruns only what
# the change touches. Then it prints the copy's headline beside the source's (docs/experiments/compare_runs.py).
# A copy that could not be set up is removed; one whose rerun failed is kept, with its log in COPY/repro.log.
# Needs the project's .venv first on PATH. Run it on an otherwise idle machine: the time budgets buy fewer steps
# when something else runs.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
[ $# -ge 2 ] || { sed -n 2,14p "$0" >&2; exit 2; }
[ -d "$1" ] || { echo "error: $1 is not a folder (give the workspace of a finished run)" >&2; exit 2; }
parent=$(cd "$(dirname "$2")" 2>/dev/null && pwd) || { echo "error: no folder $(dirname "$2") to hold $2" >&2; exit 2; }
source=$(cd "$1" && pwd); copy=$parent/$(basename "$2"); shift 2
keep=()
while [ $# -gt 0 ] && [ "$1" = --keep ]; do keep+=("$2"); shift 2; done
if [ ! -f "$source/metrics/evaluation.json" ]; then
  echo "error: $source is not a finished run (no metrics/evaluation.json)" >&2; exit 2
fi
[ ! -e "$copy" ] || { echo "error: $copy exists; give a new folder" >&2; exit 2; }
params=$(mktemp); set_up=false
trap 'rm -f "$params"; [ "$set_up" = true ] || rm -rf "$copy"' EXIT  # also on Ctrl-C: no half-made copy stays
python - "$source/params.yaml" "$params" "$@" <<'PY'
import sys

import yaml

source, target, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
params = yaml.safe_load(open(source))
for pair in pairs:
    key, equals, value = pair.partition("=")
    *path, last = key.split(".")
    section = params
    for part in path:
        section = section.get(part) if isinstance(section, dict) else None
    if not equals or not isinstance(section, dict) or last not in section:
        sys.exit(f"error: {pair!r}: give KEY=VALUE with a dotted KEY that params.yaml has")
    section[last] = yaml.safe_load(value)
yaml.safe_dump(params, open(target, "w"), sort_keys=False)
PY
cp -a "$source" "$copy"; cd "$copy"; rm -rf .cache; cp "$params" params.yaml
rm -rf components; cp -a "$here/components" components; cp "$here/dvc.yaml" dvc.yaml
find components -name __pycache__ -prune -exec rm -rf {} +
# the world model's inputs, from DVC's own graph: every node of `dvc dag diffusion_checkpoint` but itself
upstream=$(dvc dag --dot --collapse-foreach-matrix diffusion_checkpoint | sed -n 's/^"\([^"]*\)";$/\1/p' \
           | grep -vx diffusion_checkpoint)
echo "taken as they are:" $upstream "${keep[@]}"
# shellcheck disable=SC2086  # one stage name per word
dvc commit -f -q $upstream "${keep[@]}"
dvc status | grep -E "^[a-z_]+:" || true
set_up=true
if ! python -m components repro evaluation > repro.log 2>&1; then  # its metrics would be the source's: stop
  tail -n 20 repro.log >&2; echo "error: the rerun failed; its log is $copy/repro.log" >&2; exit 1
fi
grep -E "^Running stage" repro.log || true
python "$here/docs/experiments/compare_runs.py" "$source" "$copy"
