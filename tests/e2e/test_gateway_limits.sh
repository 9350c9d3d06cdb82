#!/usr/bin/env bash
# The gateway's own limits (see gateway_client.mjs, phase limits): --api-key on /v1/* and
# /admin/* (not /health and /metrics), and the bounded queue of capacity_aware: in front of one
# instance whose KV cache holds one long request at a time, with --queue-size 2 and a short
# --queue-timeout, a burst of five gets one answer, two immediate 503 queue_full and two 503
# queue_timeout, each with Retry-After; afterwards requests are served again.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
source "$HERE/gateway_lib.sh"
command -v node >/dev/null || skip "node is not installed (the test client is a Node script)"
command -v curl >/dev/null || skip "curl is not installed"
require_gateway

KEY=gw-limits-key
start_server A --model random:llama-tiny --num-kv-blocks 128 --max-model-len 2048 --threads 1
start_gateway G --policy capacity_aware --upstream "$A_URL" --api-key "$KEY" --queue-size 2 \
    --queue-timeout 0.2 --health-interval 0.2 --scrape-interval 0.1
wait_status "$G_URL/health" 200
timeout 60 node "$HERE/gateway_client.mjs" limits "$G_URL" "$KEY" ||
    { tail -n 20 "$WORK/G.log" >&2; die "limits phase"; }
stop_server G TERM
echo "PASS"
