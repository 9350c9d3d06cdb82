#!/usr/bin/env bash
# The official `openai` npm client (chat, streamed chat, completion, streamed completion, errors
# mapped to the SDK's classes) through `loom gateway` with its own API key, in front of two
# `loom serve` instances. Reuses openai_client.cjs with the gateway as the base URL. The package
# is installed once into tests/e2e/node_modules (git-ignored); without a reachable npm registry
# the test is skipped.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
source "$HERE/gateway_lib.sh"
command -v node >/dev/null || skip "node is not installed"
command -v curl >/dev/null || skip "curl is not installed"
require_gateway
if [ ! -f "$HERE/node_modules/openai/package.json" ]; then
    command -v npm >/dev/null || skip "npm is not installed (needed to fetch the openai client)"
    if ! timeout 120 npm install --prefix "$HERE" --no-save --no-package-lock --no-audit --no-fund \
        --fetch-timeout=30000 --fetch-retries=1 openai >"$WORK/npm.log" 2>&1; then
        tail -n 5 "$WORK/npm.log"
        skip "npm could not install the openai package (is the registry reachable?)"
    fi
fi
echo "openai $(node -p "require('$HERE/node_modules/openai/package.json').version")"

KEY=sk-loom-gateway-e2e
start_server A --model random:llama-tiny --num-kv-blocks 256 --threads 1
start_server B --model random:llama-tiny --num-kv-blocks 256 --threads 1
start_gateway G --policy capacity_aware --prefix-affinity --api-key "$KEY" \
    --upstream "$A_URL" --upstream "$B_URL" --health-interval 0.2
wait_status "$G_URL/health" 200
for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $KEY" "$G_URL/v1/models")" = 200 ] && break
    sleep 0.1
done
timeout 60 node "$HERE/openai_client.cjs" "$G_URL" "$KEY" || { tail -n 20 "$WORK/G.log" >&2; die "openai client through the gateway"; }
stop_server G TERM
echo "PASS"
