#!/usr/bin/env bash
# A suite's wall time with one process (--workers 1), with the default local workers (a worker per core) and on Ray
# with the same number of one-thread workers, interleaved round by round (A B C A B C: a drift in the machine's
# speed touches all three), each run in a fresh store and MLflow database (nothing reused); the table goes to
# results/perf/executors.md with the command, the machine and the load.
#   scripts/perf_executors.sh [SUITE] [extra kdbench run options]     (default suite: suites/quickstart.yaml)
#   make perf-executors ARGS="suites/quickstart.yaml"      ROUNDS=3 for three rounds (default 2)
# TEACHERS_FROM=<a store> times the student phase alone: each run's fresh store starts with that store's first wave
# (teachers and the student-alone reference, trained beforehand by the same command), so every executor runs the
# same students (assistants included) and nothing else.
set -euo pipefail
suite=${1:-suites/quickstart.yaml}; shift || true
extra=("$@")  # more kdbench run options, the same for every run
PY=${PYTHON:-$(command -v python3)}
out=${PERF_OUT:-results/perf/executors.md}
rounds=${ROUNDS:-2}
teachers=${TEACHERS_FROM:-}
work=$(mktemp -d "${TMPDIR:-/tmp}/kdbench-perf.XXXXXX")
trap 'rm -rf "$work"' EXIT
names=(one_process local_workers ray)
declare -A opts=([one_process]="--workers 1" [local_workers]="" [ray]="--executor ray --cpus-per-job 1")
declare -A label=([one_process]="one process (\`--workers 1\`)" [local_workers]="local workers (the default)"
                  [ray]="Ray, one-thread workers (\`--executor ray --cpus-per-job 1\`)")
declare -A walls
run() {  # name round: prints the wall seconds
  local name=$1 dir="$work/$1-$2" start end
  mkdir -p "$dir/store"
  if [ -n "$teachers" ]; then  # the stored models but the assistants (theirs say so in meta.json)
    grep -L '"role": "assistant"' "$teachers"/*/meta.json | xargs -n1 dirname | xargs -I{} cp -r {} "$dir/store/"
  fi
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  MLFLOW_TRACKING_URI="sqlite:///$dir/mlflow.db" KDBENCH_STORE="$dir/store" \
    "$PY" -m kdbench.cli run "$suite" --device cpu ${opts[$name]} "${extra[@]}" > "$dir/log" 2>&1 \
    || { echo "perf_executors: $name failed; its log:" >&2; tail -30 "$dir/log" >&2; exit 1; }
  end=$(date +%s.%N)
  awk "BEGIN { printf \"%.1f\", $end - $start }"
}
loads=()
for round in $(seq "$rounds"); do
  for name in "${names[@]}"; do
    loads+=("$(cut -d' ' -f1 /proc/loadavg)")
    walls[$name]+="$(run "$name" "$round") "
  done
done
median() { tr ' ' '\n' <<< "$1" | grep . | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
base=$(median "${walls[one_process]}")
mkdir -p "$(dirname "$out")"
{
  echo "# Executors: wall time of one suite"
  echo
  echo "Suite \`$suite\` on $(nproc) usable CPU cores ($(uname -n)), $(date -u +%Y-%m-%dT%H:%MZ), kdbench"
  echo "$(git rev-parse --short HEAD 2>/dev/null || echo '?'); $rounds interleaved rounds, each run in a fresh store and database;"
  echo "1-minute load average before each run: ${loads[*]}."
  echo
  echo "| executor | wall s, each round | median s | vs one process |"
  echo "| --- | --- | ---: | ---: |"
  for name in "${names[@]}"; do
    m=$(median "${walls[$name]}")
    printf '| %s | %s | %.1f | %.2fx |\n' "${label[$name]}" "${walls[$name]% }" "$m" "$(awk "BEGIN { print $base / $m }")"
  done
  echo
  echo "Every figure is the whole command (\`kdbench run $suite --device cpu ${extra[*]}\` with the executor's options):"
  echo "start-up, data, the local workers' or Ray's start, every job, MLflow writes. Ray's includes starting a local Ray."
  [ -z "$teachers" ] || echo "The student phase alone: each run's store started with the suite's first wave (teachers, reference) trained."
} > "$out"
cat "$out"
