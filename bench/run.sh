#!/usr/bin/env bash
# Runs the benchmarks and writes their tables into docs/benchmarks.md, each under the exact
# command that reproduces it. Usage: bench/run.sh [engine|moe|plan|train|gateway|client]  (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
which=${1:-all}
mkdir -p docs/bench
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d)"

# run_bench NAME TITLE COMMAND...: runs COMMAND --markdown FILE and writes docs/bench/NAME.md
run_bench() {
    local name=$1 title=$2; shift 2
    [ "$which" = all ] || [ "$which" = "$name" ] || return 0
    echo "== $*"
    "$@" --markdown "docs/bench/$name.md.tmp"
    { echo "## $title"
      echo
      echo "Command: \`make bench\` or \`$*\` (machine: $machine)."
      echo
      cat "docs/bench/$name.md.tmp"; } > "docs/bench/$name.md"
    rm -f "docs/bench/$name.md.tmp"
}

run_bench engine "bench/engine — CPU forward pass vs machine ceilings" \
    "$BUILD/bench/engine" --threads 2 --models random:llama-125m,random:mixtral-tiny --batches 1,8,32
run_bench moe "bench/moe — routing + dispatch + combine, one thread" \
    "$BUILD/bench/moe" --tokens 512 --reps 5
run_bench plan "bench/plan — planning a 10,000-machine cluster of 8 device types" \
    "$BUILD/bench/plan" --machines 10000 --reps 5
run_bench train "bench/train — training throughput of the shakespeare-moe shape, 1 vs 2 ranks" \
    "$BUILD/bench/train" --ranks 1,2
run_bench gateway "bench/gateway — latency the gateway adds and its max requests/s, beside nginx and HAProxy" \
    "$BUILD/bench/gateway"
run_bench client "bench/client_ceiling — loom bench's own ceiling against a trivial streaming upstream" \
    "$BUILD/bench/client_ceiling" --seconds 3

{ echo "# Benchmarks"
  echo
  echo "Every figure below was produced by the command printed above its table, in one run, so"
  echo "ratios within a table are comparable even on a shared, noisy machine."
  for f in docs/bench/*.md; do echo; cat "$f"; done
  [ -f docs/bench-notes.md ] && { echo; cat docs/bench-notes.md; }
} > docs/benchmarks.md
echo "wrote docs/benchmarks.md"
