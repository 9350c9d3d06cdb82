#!/usr/bin/env bash
# End-to-end test of `loom serve` over loopback (see serve_client.mjs for the checks):
# 64 concurrent streaming and non-streaming requests answered exactly once with correct usage,
# /metrics parsed strictly, clients killed mid-request free their KV blocks, error statuses
# (400, 401, 404, 405, 413, 503), and a clean exit on SIGTERM and SIGINT.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
command -v node >/dev/null || skip "node is not installed (the test client is a Node script)"

start_server A --model random:llama-tiny --num-kv-blocks 1024 --threads 1
echo "server A at $A_URL"
timeout 60 node "$HERE/serve_client.mjs" main "$A_URL" || { tail -n 20 "$WORK/A.log" >&2; die "main phase"; }

KEY=e2e-secret-key
start_server B --model random:llama-tiny --num-kv-blocks 256 --threads 1 --api-key "$KEY" \
    --max-num-seqs 1 --max-waiting 1 --max-body-bytes 4096
echo "server B at $B_URL"
timeout 60 node "$HERE/serve_client.mjs" limits "$B_URL" "$KEY" || { tail -n 20 "$WORK/B.log" >&2; die "limits phase"; }

stop_server A TERM
stop_server B INT
grep -q 'stopped' "$WORK/A.log" || die "A did not report a clean stop"
echo "PASS"
