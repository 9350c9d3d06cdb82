#!/usr/bin/env bash
# Issue 4, acceptance 4: replay the Mooncake conversation trace (time-scaled) against `loom up`
# with two emulated instances (H100-80G and A100-80G serving a Llama-3-8B shape: config only, no
# weights), and write the report, the JSON and the plots.
#   LOOM_BIN=build/loom N=200 SCALE=1 OUT=/tmp/mooncake bench/mooncake_up.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LOOM_BIN=${LOOM_BIN:-build/loom}
N=${N:-200}
SCALE=${SCALE:-1}
OUT=${OUT:-$(mktemp -d /tmp/loom-mooncake.XXXXXX)}
TRACE=${TRACE:-../shared/data/traces/mooncake_conversation.jsonl}
mkdir -p "$OUT"
printf 'machines:\n  - {name: h100, device: H100-80G, count: 1, host: 127.0.0.1}\n  - {name: a100, device: A100-80G, count: 1, host: 127.0.0.1}\n' >"$OUT/cluster.yaml"
"$LOOM_BIN" plan --cluster "$OUT/cluster.yaml" --model data/models/llama-3-8b \
    --workload "$TRACE" --output "$OUT/plan.yaml" --quiet
"$LOOM_BIN" up "$OUT/plan.yaml" --model data/models/llama-3-8b --port 0 --log-dir "$OUT/logs" \
    >"$OUT/up.log" 2>&1 &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null' EXIT
url=""
for _ in $(seq 300); do
    url=$(grep -o 'endpoint http://[0-9.]*:[0-9]*' "$OUT/up.log" | sed 's/^endpoint //' || true)
    [ -n "$url" ] && break
    kill -0 $UP 2>/dev/null || { cat "$OUT/up.log"; exit 1; }
    sleep 0.1
done
[ -n "$url" ] || { echo "loom up did not start"; cat "$OUT/up.log"; exit 1; }
"$LOOM_BIN" bench --url "$url" --trace "$TRACE" --time-scale "$SCALE" --max-requests "$N" \
    --slo ttft=2s,tpot=200ms --out "$OUT/result.json" --plot "$OUT/plots" | tee "$OUT/report.txt"
ls -la "$OUT" "$OUT/plots"
