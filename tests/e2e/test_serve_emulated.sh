#!/usr/bin/env bash
# `loom serve --backend emulated`: the real engine with modelled step times. It answers
# completions (random tokens, exactly max_tokens of them), says "emulated" in /v1/models and in
# /metrics (loom:backend_info), and refuses an unknown device or a model that does not fit with
# exit status 2.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
ROOT=$(cd "$HERE/../.." && pwd)
export LOOM_CATALOG=${LOOM_CATALOG:-$ROOT/data/devices.yaml}
command -v curl >/dev/null || skip "curl is not installed"

start_server EMU --backend emulated --device H100-80G --tp 2 --model random:llama-1b \
    --max-num-seqs 64
grep -q 'backend emulated: H100-80G x2' "$WORK/EMU.log" || die "no 'backend emulated' start line"

models=$(curl -sf "$EMU_URL/v1/models") || die "GET /v1/models failed"
echo "$models" | grep -q '"backend":"emulated"' || die "/v1/models does not say emulated: $models"

# a few requests at once: each gets exactly max_tokens tokens
clients=()
for i in 1 2 3 4; do
    curl -sf "$EMU_URL/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"model\": \"random:llama-1b\", \"prompt\": \"hello number $i\", \"max_tokens\": 24}" \
        >"$WORK/c$i.json" &
    clients+=($!)
done
for pid in "${clients[@]}"; do wait "$pid"; done
for i in 1 2 3 4; do
    grep -q '"completion_tokens":24' "$WORK/c$i.json" || die "request $i: $(head -c 300 "$WORK/c$i.json")"
    grep -q '"finish_reason":"length"' "$WORK/c$i.json" || die "request $i did not end at max_tokens"
done
# streaming works too
curl -sfN "$EMU_URL/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "random:llama-1b", "prompt": "hi", "max_tokens": 8, "stream": true}' >"$WORK/s.txt" ||
    die "streaming request failed"
grep -q 'data: \[DONE\]' "$WORK/s.txt" || die "stream did not end with [DONE]"

metrics=$(curl -sf "$EMU_URL/metrics") || die "GET /metrics failed"
echo "$metrics" | grep -q '^loom:backend_info{.*backend="emulated".*} 1' ||
    die "/metrics has no loom:backend_info with backend=\"emulated\""
echo "$metrics" | grep -qE '^vllm:generation_tokens_total\{.*\} (1[0-9][0-9]|[2-9][0-9])' ||
    die "generation token counter did not count the requests"
stop_server EMU TERM

# refusals: exit status 2 and a message naming the problem
expect2() {
    local name=$1 pattern=$2
    shift 2
    timeout 30 "$LOOM_BIN" serve --port 0 "$@" >"$WORK/out" 2>"$WORK/err"
    local rc=$?
    [ "$rc" -eq 2 ] || { cat "$WORK/err" >&2; die "$name: exit status $rc, want 2"; }
    grep -qiE "$pattern" "$WORK/err" || { cat "$WORK/err" >&2; die "$name: message lacks /$pattern/"; }
    echo "ok   $name"
}
expect2 "unknown device" "Z9000" --backend emulated --device Z9000 --model random:llama-tiny
expect2 "no --device" "needs --device" --backend emulated --model random:llama-tiny
expect2 "tp that divides nothing" "divide" --backend emulated --device H100-80G --tp 3 \
    --model random:llama-1b
echo "PASS test_serve_emulated"
