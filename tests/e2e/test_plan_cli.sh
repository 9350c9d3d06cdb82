#!/usr/bin/env bash
# `loom plan` from the outside (issue 3, acceptance 5): impossible inputs (a model larger than
# every machine, an unknown device, a TP that divides nothing, an empty trace) give one clear
# message and exit status 2; a normal plan succeeds and its plan.yaml round-trips through
# `loom plan --check`. Everything is written under a temporary directory.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
: "${LOOM_BIN:?set LOOM_BIN to the loom binary}"
ROOT=$(cd "$HERE/../.." && pwd)
export LOOM_CATALOG=${LOOM_CATALOG:-$ROOT/data/devices.yaml}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/loom-plan-e2e.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK" || exit 1
failures=0

fail() {
    echo "FAIL $*"
    failures=$((failures + 1))
}

# expect NAME WANT_RC PATTERN loom-plan-flags...: exit status WANT_RC and PATTERN (grep -E) on
# stderr (WANT_RC 2) or stdout (WANT_RC 0).
expect() {
    local name=$1 want=$2 pattern=$3
    shift 3
    timeout 30 "$LOOM_BIN" plan "$@" >"$WORK/out" 2>"$WORK/err"
    local rc=$?
    local where="$WORK/err"
    [ "$want" -eq 0 ] && where="$WORK/out"
    if [ "$rc" -ne "$want" ]; then
        fail "$name: exit status $rc, want $want"
        sed 's/^/    /' "$WORK/err" | head -n 5
        return
    fi
    if ! grep -qE "$pattern" "$where"; then
        fail "$name: no /$pattern/ in the output"
        sed 's/^/    /' "$where" | head -n 5
        return
    fi
    echo "ok   $name"
}

# a Llama-3-70B-shaped config: 131 GiB of bf16 weights
cat >big-config.json <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
 "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80,
 "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
 "tie_word_embeddings": false}
JSON
printf 'machines:\n  - {name: t4, device: T4, count: 1}\n  - {name: l4, device: L4, count: 2}\n' >small.yaml
printf 'machines:\n  - {name: z, device: Z9000, count: 2}\n' >unknown.yaml
printf 'machines:\n  - {name: h100, device: H100-80G, count: 4}\n  - {name: v100, device: V100-32G, count: 2, replicas: 2}\n' >mixed.yaml
printf 'TIMESTAMP,ContextTokens,GeneratedTokens\n' >empty.csv
: >empty.jsonl

expect "model larger than every machine" 2 'fits on no machine.*weights .* GiB' \
    --cluster small.yaml --model big-config.json --no-output
expect "unknown device" 2 "unknown device 'Z9000'" --cluster unknown.yaml --model random:llama-1b \
    --no-output
expect "TP that divides nothing" 2 'TP=3: 3 does not divide 32 heads and 8 KV heads' \
    --cluster mixed.yaml --model random:llama-1b --tp 3 --no-output
# threads on the host's pooled cores need not divide the heads (12 of llama-125m)
printf 'machines:\n  - {name: host, device: cpu, count: 8}\n' >cpu8.yaml
expect "TP=8 on pooled cpu cores" 0 'cpu +8 ' --cluster cpu8.yaml \
    --model random:llama-125m --tp 8 --output cpu8-plan.yaml
expect "empty Azure trace" 2 'no requests' --cluster mixed.yaml --model random:llama-1b \
    --workload empty.csv --no-output
expect "empty Mooncake trace" 2 'no requests' --cluster mixed.yaml --model random:llama-1b \
    --workload empty.jsonl --no-output
expect "bad flag" 2 "loom plan --help" --cluster mixed.yaml --model random:llama-1b --frobnicate
expect "missing cluster file" 2 'nope.yaml' --cluster nope.yaml --model random:llama-1b --no-output

# a normal plan, then its file through --check (alone, with the cluster, with the model)
expect "normal plan" 0 'best partition' --cluster mixed.yaml --model random:llama-1b \
    --input-len 512 --output-len 128 --output plan.yaml --explain H100-80G:2
[ -s plan.yaml ] || fail "normal plan: plan.yaml not written"
grep -q 'kv_blocks:' plan.yaml || fail "plan.yaml has no kv_blocks"
expect "plan.yaml round-trips" 0 'valid, [0-9]+ instances.*round-trips' --check plan.yaml
expect "plan.yaml matches cluster and model" 0 'round-trips; matches the cluster; fits the memory model' \
    --check plan.yaml --cluster mixed.yaml --model random:llama-1b
# a damaged plan is caught: the first instance's tp no longer matches its devices
sed '0,/tp: [0-9]*/s//tp: 3/' plan.yaml >bad-plan.yaml
expect "damaged plan.yaml" 2 'bad-plan.yaml' --check bad-plan.yaml

if [ "$failures" -ne 0 ]; then
    echo "$failures failure(s)"
    exit 1
fi
echo "PASS test_plan_cli"
