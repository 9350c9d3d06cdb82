#!/usr/bin/env bash
# Runs the benchmarks and writes their tables into docs/benchmarks.md, each under the exact
# command that reproduces it. Usage: bench/run.sh [engine|moe|plan|client]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
which=${1:-all}
mkdir -p docs/bench
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%Y-%m-%d)"

if [ "$which" = all ] || [ "$which" = engine ]; then
    cmd="$BUILD/bench/engine --threads 2 --models random:llama-125m,random:mixtral-tiny --batches 1,8,32"
    echo "== $cmd"
    $cmd --markdown docs/bench/engine.md.tmp
    { echo "## bench/engine — CPU forward pass vs machine ceilings"
      echo
      echo "Command: \`make bench\` or \`$cmd\` (machine: $machine)."
      echo
      cat docs/bench/engine.md.tmp; } > docs/bench/engine.md
    rm -f docs/bench/engine.md.tmp
fi

if [ "$which" = all ] || [ "$which" = moe ]; then
    cmd="$BUILD/bench/moe --tokens 512 --reps 5"
    echo "== $cmd"
    $cmd --markdown docs/bench/moe.md.tmp
    { echo "## bench/moe — routing + dispatch + combine, one thread"
      echo
      echo "Command: \`make bench\` or \`$cmd\` (machine: $machine)."
      echo
      cat docs/bench/moe.md.tmp; } > docs/bench/moe.md
    rm -f docs/bench/moe.md.tmp
fi

if [ "$which" = all ] || [ "$which" = plan ]; then
    cmd="$BUILD/bench/plan --machines 10000 --reps 5"
    echo "== $cmd"
    $cmd --markdown docs/bench/plan.md.tmp
    { echo "## bench/plan — planning a 10,000-machine cluster of 8 device types"
      echo
      echo "Command: \`make bench\` or \`$cmd\` (machine: $machine)."
      echo
      cat docs/bench/plan.md.tmp; } > docs/bench/plan.md
    rm -f docs/bench/plan.md.tmp
fi

if [ "$which" = all ] || [ "$which" = client ]; then
    cmd="$BUILD/bench/client_ceiling --seconds 3"
    echo "== $cmd"
    $cmd --markdown docs/bench/client.md.tmp
    { echo "## bench/client_ceiling — loom bench's own ceiling against a trivial streaming upstream"
      echo
      echo "Command: \`make bench\` or \`$cmd\` (machine: $machine)."
      echo
      cat docs/bench/client.md.tmp; } > docs/bench/client.md
    rm -f docs/bench/client.md.tmp
fi

{ echo "# Benchmarks"
  echo
  echo "Every figure below was produced by the command printed above its table, in one run, so"
  echo "ratios within a table are comparable even on a shared, noisy machine."
  for f in docs/bench/*.md; do echo; cat "$f"; done
  [ -f docs/bench-notes.md ] && { echo; cat docs/bench-notes.md; }
} > docs/benchmarks.md
echo "wrote docs/benchmarks.md"
