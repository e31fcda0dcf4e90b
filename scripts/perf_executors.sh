#!/usr/bin/env bash
# A suite's wall time in-process against Ray with two one-thread workers, back to back, each in a fresh store
# and MLflow database (nothing reused), written to results/perf/executors.md with the command and the machine.
#   scripts/perf_executors.sh [SUITE] [extra kdbench run options]     (default suite: suites/quickstart.yaml)
#   make perf-executors ARGS="suites/quickstart.yaml"
# PERF_KEEP=DIR keeps both runs' stores and databases in DIR (DIR/inprocess/mlflow.db, DIR/ray/mlflow.db).
set -euo pipefail
suite=${1:-suites/quickstart.yaml}; shift || true
PY=${PYTHON:-$(command -v python3)}
out=${PERF_OUT:-results/perf/executors.md}
if [ -n "${PERF_KEEP:-}" ]; then
  work=$PERF_KEEP; rm -rf "$work/inprocess" "$work/ray"; mkdir -p "$work"
else
  work=$(mktemp -d "${TMPDIR:-/tmp}/kdbench-perf.XXXXXX")
  trap 'rm -rf "$work"' EXIT
fi
load_before=$(cut -d" " -f1-3 /proc/loadavg)
export OMP_NUM_THREADS=1
run() {  # name, kdbench run options...; prints the wall seconds
  local name=$1; shift
  mkdir -p "$work/$name"
  local start end
  start=$(date +%s.%N)
  MLFLOW_TRACKING_URI="sqlite:///$work/$name/mlflow.db" KDBENCH_STORE="$work/$name/store" \
    "$PY" -m kdbench.cli run "$suite" --device cpu "$@" > "$work/$name/log" 2>&1 \
    || { echo "perf_executors: $name failed; its log:" >&2; tail -30 "$work/$name/log" >&2; exit 1; }
  end=$(date +%s.%N)
  awk "BEGIN { print $end - $start }"
}
inproc=$(run inprocess --executor inprocess "$@")
ray=$(run ray --executor ray --cpus-per-job 1 "$@")
mkdir -p "$(dirname "$out")"
{
  echo "# Executors: wall time of one suite"
  echo
  echo "Suite \`$suite\` on $(nproc --all) CPU cores ($(uname -n), load average before: $load_before),"
  echo "$(date -u +%Y-%m-%dT%H:%MZ), kdbench $(git rev-parse --short HEAD 2>/dev/null || echo '?'); each run in a fresh store and database."
  echo
  echo "| executor | command | wall s |"
  echo "| --- | --- | ---: |"
  printf '| in-process | `kdbench run %s --device cpu %s` | %.1f |\n' "$suite" "$*" "$inproc"
  printf '| Ray, 2 one-thread workers | `kdbench run %s --device cpu --executor ray --cpus-per-job 1 %s` | %.1f |\n' "$suite" "$*" "$ray"
  echo
  echo "Ray's figure includes starting a local Ray (tens of seconds on a loaded machine)."
} > "$out"
cat "$out"
