#!/usr/bin/env bash
# One entry point for set-up: creates .venv if missing (or if the dependencies changed),
# then runs what was asked.  Usage: bash run.sh quickstart | test [pytest args] | mixprec ARGS
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}
stamp="$VENV/.mixprec-deps"
want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[run.sh] installing dependencies into $VENV (first run only)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # Pinned: the CPU wheel. An unpinned torch pulls gigabytes of CUDA packages.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2
  # The export formats (QONNX, hls4ml) and Ray are optional extras for users; the tests exercise them.
  "$VENV/bin/python" -m pip install -q -e ".[test,onnx,hls4ml,ray]" >&2
  echo "$want" > "$stamp"
fi

cmd=${1:-quickstart}
shift || true
case "$cmd" in
  quickstart) exec "$VENV/bin/mixprec" quickstart "$@" ;;
  test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  mixprec) exec "$VENV/bin/mixprec" "$@" ;;
  *) echo "usage: bash run.sh quickstart | test [pytest args] | mixprec ARGS" >&2; exit 2 ;;
esac
