#!/usr/bin/env bash
# vLLM's POST /tokenize and POST /detokenize through `loom gateway`, in front of two `loom serve`
# instances: passed through unchanged (status and body as the instance answers, compared with
# asking an instance directly) with x-loom-instance, in turn to both instances, the gateway's own
# errors for a body that is not JSON (400) and a GET (405), the instance's own 400 passed on, the
# API key required, and still answered when one instance is dead (retried on the other).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
source "$HERE/gateway_lib.sh"
command -v curl >/dev/null || skip "curl is not installed"
require_gateway

start_server A --model random:llama-tiny --num-kv-blocks 256 --threads 1
start_server B --model random:llama-tiny --num-kv-blocks 256 --threads 1
KEY=sk-tokenize-e2e
start_gateway G --policy capacity_aware --upstream "$A_URL" --upstream "$B_URL" \
    --api-key "$KEY" --health-interval 0.2 --health-timeout 1
wait_status "$G_URL/health" 200
AUTH="Authorization: Bearer $KEY"

# post PATH BODY [URL] -> status; body in $WORK/body, headers in $WORK/h
post() {
    curl -s -D "$WORK/h" -o "$WORK/body" -w '%{http_code}' --max-time 10 "${3:-$G_URL}$1" \
        -H "$AUTH" -H 'Content-Type: application/json' -d "$2"
}

code=$(post /tokenize '{"prompt": "Hello, world"}' "$A_URL")
[ "$code" = 200 ] || die "direct /tokenize: $code $(cat "$WORK/body")"
direct=$(cat "$WORK/body")
: >"$WORK/instances"
for i in 1 2 3 4; do
    code=$(post /tokenize '{"prompt": "Hello, world"}')
    [ "$code" = 200 ] || die "/tokenize $i through the gateway: $code $(cat "$WORK/body")"
    [ "$(cat "$WORK/body")" = "$direct" ] || die "/tokenize body differs: $(cat "$WORK/body") vs $direct"
    grep -i '^x-loom-instance:' "$WORK/h" | tr -d '\r' | awk '{print $2}' >>"$WORK/instances"
done
[ "$(sort -u "$WORK/instances" | wc -l)" = 2 ] || die "want both instances used: $(cat "$WORK/instances")"

ids=$(sed 's/.*"tokens":\(\[[0-9,]*\]\).*/\1/' <<<"$direct")
code=$(post /detokenize "{\"tokens\": $ids}")
[ "$code" = 200 ] || die "/detokenize: $code $(cat "$WORK/body")"
grep -q '"prompt":"Hello, world"' "$WORK/body" || die "/detokenize round trip: $(cat "$WORK/body")"

# errors: the instance's own (passed on), the gateway's (not JSON, wrong method, no key)
code=$(post /detokenize '{"tokens": "x"}')
[ "$code" = 400 ] || die "bad tokens: status $code"
grep -q '"param":"tokens"' "$WORK/body" || die "bad tokens: not the instance's error: $(cat "$WORK/body")"
grep -qi '^x-loom-instance:' "$WORK/h" || die "bad tokens: no x-loom-instance"
code=$(post /tokenize 'not json')
[ "$code" = 400 ] && grep -q '"code":"invalid_json"' "$WORK/body" || die "garbage: $code $(cat "$WORK/body")"
code=$(curl -s -o "$WORK/body" -w '%{http_code}' -H "$AUTH" "$G_URL/tokenize")
[ "$code" = 405 ] || die "GET /tokenize: status $code"
code=$(curl -s -o "$WORK/body" -w '%{http_code}' "$G_URL/tokenize" -d '{"prompt": "x"}')
[ "$code" = 401 ] || die "/tokenize without the key: status $code"

# pass-through requests are not dispatches: the policy's books and shares stay untouched
curl -s -H "$AUTH" "$G_URL/admin/upstreams" >"$WORK/ups.json"
grep -q '"dispatched":[1-9]' "$WORK/ups.json" && die "/tokenize counted as dispatches: $(cat "$WORK/ups.json")"

# one instance dead: every /tokenize is still answered, by the other
kill -KILL "$B_PID"
for i in $(seq 6); do
    code=$(post /tokenize '{"prompt": "Hello, world"}')
    [ "$code" = 200 ] || die "/tokenize $i with B dead: $code $(cat "$WORK/body")"
    grep -qi "^x-loom-instance: $A_URL" "$WORK/h" || die "/tokenize $i with B dead: not from A"
done
stop_server G TERM
echo "PASS"
