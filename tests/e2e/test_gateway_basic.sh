#!/usr/bin/env bash
# `loom gateway` in front of two `loom serve` instances (see gateway_client.mjs, phase basic):
# 48 concurrent mixed requests answered exactly once (counted at the instances), the
# x-loom-instance header, SSE passed through as produced, /v1/models and /metrics, errors for
# garbage and oversized bodies, drain and undrain, a disconnecting client freeing its instance,
# and a clean exit on SIGTERM.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
source "$HERE/gateway_lib.sh"
command -v node >/dev/null || skip "node is not installed (the test client is a Node script)"
command -v curl >/dev/null || skip "curl is not installed"
require_gateway

start_server A --model random:llama-tiny --num-kv-blocks 512 --threads 1
start_server B --model random:llama-tiny --num-kv-blocks 512 --threads 1
start_gateway G --policy capacity_aware --upstream "$A_URL" --upstream "$B_URL" \
    --max-body-bytes 64KiB --health-interval 0.2 --scrape-interval 0.2
echo "instances $A_URL $B_URL, gateway $G_URL"
wait_status "$G_URL/v1/models" 200
timeout 60 node "$HERE/gateway_client.mjs" basic "$G_URL" "$A_URL,$B_URL" ||
    { tail -n 20 "$WORK/G.log" >&2; die "basic phase"; }
stop_server G TERM
grep -q 'stopped' "$WORK/G.log" || die "the gateway did not report a clean stop"
echo "PASS"
