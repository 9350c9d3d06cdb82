#!/usr/bin/env bash
# `loom gateway --plan plan.yaml`: the instances of a plan with the plan's predicted rates, KV
# sizes and weights. (1) With --upstream URLs (one per plan instance, plan order) giving the
# addresses: completions are served and /admin/upstreams shows the plan's figures. (2) Without:
# addresses are host:--plan-base-port + rank on the host. (3) A count mismatch is a usage error.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
source "$HERE/gateway_lib.sh"
command -v curl >/dev/null || skip "curl is not installed"
command -v jq >/dev/null || skip "jq is not installed"
require_gateway

# a plan with two instances of unequal speed on this host, written by `loom plan`
printf 'machines:\n  - {name: fast, device: H100-80G, count: 1, host: 127.0.0.1}\n  - {name: slow, device: T4, count: 1, host: 127.0.0.1}\n' >"$WORK/cluster.yaml"
(cd "$HERE/../.." && "$LOOM_BIN" plan --cluster "$WORK/cluster.yaml" --model random:llama-tiny \
    --output "$WORK/plan.yaml" --quiet >"$WORK/plan.log" 2>&1) || die "loom plan: $(cat "$WORK/plan.log")"
rates=$(awk '/^    (prefill|decode)_tokens_per_s:/ {printf "%s ", $2}' "$WORK/plan.yaml")
read -r pf0 dec0 pf1 dec1 <<<"$rates"
[ -n "$dec1" ] || die "no rates in the plan: $(cat "$WORK/plan.yaml")"

start_server A --model random:llama-tiny --num-kv-blocks 256 --threads 1
start_server B --model random:llama-tiny --num-kv-blocks 256 --threads 1
start_gateway G --policy weighted_round_robin --plan "$WORK/plan.yaml" \
    --upstream "$A_URL" --upstream "$B_URL" --health-interval 0.2
wait_status "$G_URL/health" 200
for i in 1 2 3 4; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 20 "$G_URL/v1/completions" \
        -H 'Content-Type: application/json' -d '{"prompt": "Hello", "max_tokens": 4}')
    [ "$code" = 200 ] || die "completion $i through the plan's gateway: status $code"
done
ups=$(curl -s "$G_URL/admin/upstreams")
check() { # JQ-EXPR WANT
    local got
    got=$(jq -r "$1" <<<"$ups")
    awk -v a="$got" -v b="$2" 'BEGIN {exit !(a + 0 > 0 && (a - b) / b < 1e-3 && (b - a) / b < 1e-3)}' ||
        die "$1 = $got, want $2 (from the plan): $ups"
}
up0='([.upstreams[]?] + [.[]?] | map(select(type == "object" and .url != null)))'
check "$up0[0].prefill_rate" "$pf0"
check "$up0[1].decode_rate" "$dec1"
# weights: predicted output tokens/s relative to the slowest (the T4 instance: weight 1)
w0=$(jq -r "$up0[0].weight" <<<"$ups")
w1=$(jq -r "$up0[1].weight" <<<"$ups")
awk -v a="$w0" -v b="$w1" 'BEGIN {exit !(b == 1 && a > 1)}' || die "weights $w0, $w1: want > 1 and 1"
grep -q "rates and KV sizes from" "$WORK/G.log" || die "no plan line in the gateway's log"
stop_server G TERM

# addresses from the plan alone: 127.0.0.1:BASE and BASE+1 (nothing listens there: no check)
start_gateway H --plan "$WORK/plan.yaml" --plan-base-port 9 --health-interval 0
grep -q 'http://127.0.0.1:9(w=[0-9.]*) http://127.0.0.1:10(w=1)' "$WORK/H.log" ||
    die "want upstreams 127.0.0.1:9 and :10: $(head -2 "$WORK/H.log")"
stop_server H TERM

# one --upstream for a two-instance plan: usage error
"$GATEWAY_BIN" gateway --plan "$WORK/plan.yaml" --upstream "$A_URL" --port 0 >"$WORK/bad.log" 2>&1
rc=$?
[ "$rc" = 2 ] || die "count mismatch: exit $rc, want 2: $(cat "$WORK/bad.log")"
grep -q "one per instance" "$WORK/bad.log" || die "count mismatch message: $(cat "$WORK/bad.log")"
echo "PASS"
