#!/usr/bin/env bash
# Issue 5, acceptance 2: capacity_aware against the baselines on heterogeneous emulated
# clusters, end to end on loopback (loom serve --backend emulated instances, one loom gateway
# per policy in front of the same instances, loom bench as the client). Writes markdown tables
# to stdout (docs/heterogeneous.md holds a run's).
#
#   bench/hetero.sh                       # both clusters; LOOM_BIN=build/loom by default
#   CLUSTERS=pair N=48 ROUNDS=3 bench/hetero.sh
#   PAIR_POLICIES="capacity_aware capacity_aware:--no-hold-beyond-batch round_robin" bench/hetero.sh
#       (a policy may carry gateway flags after a colon; the first is the one compared)
#
# Clusters: "pair", an emulated H100-80G and an emulated V100-32G (decode rates 3.40x apart at
# the batch used), and "four", one machine each of H100-80G, A100-40G, 2x L4, 2x T4 (loom plan
# picks tp 2 on the L4 and T4 machines). Model: a 13B Llama shape with grouped-query attention
# (written to the work directory as config.json: emulated instances need no weights), max 8
# running sequences per instance (MAX_SEQS), so the tokens streamed stay within what this small
# host's CPU forwards without becoming the bottleneck (checked: CPU share of every process).
#
# Workload: an offline batch (loom bench --batch N: all N submitted at once), prompt and output
# lengths of the first N requests of the Azure 2023 conversation trace (--trace; timestamps
# ignored under --batch). Throughput: output tokens over the makespan of each run.
#
# Every gateway gets the plan (--plan, with --upstream giving the instances' addresses in plan
# order): capacity_aware starts from the plan's predicted prefill/decode rates and KV sizes
# (an offline batch is dispatched before anything can be learnt online), weighted_round_robin
# weighs by the predicted output tokens/s; round_robin and least_requests ignore both. The
# policies run in turn (loom bench --rounds R --interleave runs: A B C A B C ...), each round on
# the same prompts.
set -uo pipefail
cd "$(dirname "$0")/.."
LOOM=${LOOM_BIN:-build/loom}
TRACE=${TRACE:-../shared/data/traces/azure2023_conv.csv}
N=${N:-48}
ROUNDS=${ROUNDS:-3}
MAX_SEQS=${MAX_SEQS:-8}
CLUSTERS=${CLUSTERS:-"pair four"}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/loom-hetero.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
log() { echo "$*" >&2; }
die() { echo "hetero: $*" >&2; exit 1; }
TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
[ -x "$LOOM" ] || die "no $LOOM (make first, or LOOM_BIN=...)"
[ -r "$TRACE" ] || die "no trace $TRACE"

mkdir -p "$WORK/model"
cat >"$WORK/model/config.json" <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 5120,
 "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
 "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
 "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
 "tie_word_embeddings": false}
EOF
printf 'machines:\n  - {name: h100, device: H100-80G, count: 1, host: 127.0.0.1}\n  - {name: v100, device: V100-32G, count: 1, host: 127.0.0.1}\n' >"$WORK/pair.yaml"
printf 'machines:\n  - {name: h100, device: H100-80G, count: 1, host: 127.0.0.1}\n  - {name: a100, device: A100-40G, count: 1, host: 127.0.0.1}\n  - {name: l4, device: L4, count: 2, host: 127.0.0.1}\n  - {name: t4, device: T4, count: 2, host: 127.0.0.1}\n' >"$WORK/four.yaml"
# the first N requests of the trace, as their own trace file
head -n $((N + 1)) "$TRACE" >"$WORK/trace.csv"

source bench/lib.sh # wait_line (the working directory is the repository root)

# run_cluster NAME POLICIES...
run_cluster() {
    local name=$1
    shift
    local policies=("$@")
    local plan="$WORK/plan-$name.yaml"
    "$LOOM" plan --cluster "$WORK/$name.yaml" --model "$WORK/model" --workload "$WORK/trace.csv" \
        --max-num-seqs "$MAX_SEQS" --output "$plan" --quiet >/dev/null 2>>"$WORK/log" ||
        die "plan $name: $(tail -2 "$WORK/log")"
    # one emulated instance per plan instance: device, tp, kv_blocks, max_batch, rates
    awk '/^  - machine:/ {i++} i && /^    (device|tp|kv_blocks|max_batch|decode_tokens_per_s|output_tokens_per_s):/ {
            gsub(/"/, "", $2); v[i, $1] = $2 }
         END { for (k = 1; k <= i; k++) print v[k, "device:"], v[k, "tp:"], v[k, "kv_blocks:"],
               v[k, "max_batch:"], v[k, "decode_tokens_per_s:"], v[k, "output_tokens_per_s:"] }' \
        "$plan" >"$WORK/inst-$name"
    local ups=() spids=() k=0 dev tp kv mb dec out
    echo "### cluster \`$name\`"
    echo
    echo "| instance | device | tp | KV blocks | max seqs | predicted decode tok/s | predicted output tok/s |"
    echo "|---|---|---|---|---|---|---|"
    while read -r dev tp kv mb dec out; do
        # 5% under the plan's KV blocks: loom serve's emulated capacity is below the planner's
        # when the plan was made with a smaller --max-num-seqs (see docs/heterogeneous.md)
        kv=$((kv * 95 / 100))
        "$LOOM" serve --backend emulated --device "$dev" --tp "$tp" --model "$WORK/model" \
            --served-model-name m13 --num-kv-blocks "$kv" --max-num-seqs "$mb" \
            --host 127.0.0.1 --port 0 >"$WORK/serve-$name-$k.log" 2>&1 &
        PIDS+=($!)
        spids+=($!)
        local u
        u=$(wait_line "$WORK/serve-$name-$k.log" $! 30) || exit 1
        ups+=(--upstream "$u")
        echo "| $k | $dev | $tp | $kv | $mb | $dec | $out |"
        k=$((k + 1))
    done <"$WORK/inst-$name"
    echo
    local urls=() labels=() gpids=() p
    # GATEWAY_FLAGS: extra flags for every gateway (e.g. --no-hold-beyond-batch)
    for p in "${policies[@]}"; do
        # a policy may carry gateway flags after a colon: capacity_aware:--no-hold-beyond-batch
        local pflags=""
        [[ $p == *:* ]] && pflags=${p#*:}
        "$LOOM" gateway --policy "${p%%:*}" $pflags --plan "$plan" "${ups[@]}" ${GATEWAY_FLAGS:-} --host 127.0.0.1 --port 0 \
            --health-interval 1 >"$WORK/gw-$name-$p.log" 2>&1 &
        PIDS+=($!)
        gpids+=($!)
        local g
        g=$(wait_line "$WORK/gw-$name-$p.log" $! 30) || exit 1
        urls+=(--url "$g")
        labels+=(--label "$p")
    done
    local before=() pid
    for pid in "${spids[@]}" "${gpids[@]}"; do before+=("$(cpu_ticks "$pid")"); done
    local t0 t1
    t0=$(date +%s.%N)
    log "== $name: ${#policies[@]} policies x $ROUNDS rounds, $N requests each"
    /usr/bin/time -f '%U %S' -o "$WORK/time-$name" "$LOOM" bench "${urls[@]}" "${labels[@]}" \
        --model m13 --trace "$WORK/trace.csv" --batch "$N" \
        --rounds "$ROUNDS" --interleave runs --prompt-mode ids --no-progress --quiet \
        --out "$WORK/bench-$name.json" >/dev/null 2>>"$WORK/log" ||
        die "bench $name: $(tail -3 "$WORK/log")"
    t1=$(date +%s.%N)
    local wall
    wall=$(awk -v x="$t0" -v y="$t1" 'BEGIN {print y - x}')
    [ -n "${KEEP:-}" ] && cp "$WORK/bench-$name.json" "${KEEP}-$name.json"

    # per round and policy: output tokens / makespan; instance shares
    echo "| round | $(printf '%s | ' "${policies[@]}")"
    echo "|---|$(printf -- '---|%.0s' "${policies[@]}")"
    jq -r --argjson np "${#policies[@]}" '
        [.requests[] | select(.error == null or .error == "" or .error == "ok")] as $ok
        | [range(0; ([$ok[].round] | max) + 1)] | .[] as $r
        | [range(0; $np) | . as $t
           | [$ok[] | select(.round == $r and .target == $t)]
           | ((map(.output_tokens) | add) / ((map(.end_s) | max) - (map(.start_s) | min)))]
        | "| \($r + 1) | " + (map(. * 10 | round / 10 | tostring) | join(" | ")) + " |"' \
        "$WORK/bench-$name.json"
    jq -r --argjson np "${#policies[@]}" '
        [.requests[] | select(.error == null or .error == "" or .error == "ok")] as $ok
        | [range(0; $np) | . as $t
           | [$ok[] | select(.target == $t)] | group_by(.round)
           | map((map(.output_tokens) | add) / ((map(.end_s) | max) - (map(.start_s) | min)))
           | add / length] as $m
        | "| **mean** | " + ($m | map(. * 10 | round / 10 | tostring) | join(" | ")) + " |",
          "| **vs capacity_aware** | " + ($m | map(($m[0] / .) * 1000 | round / 1000 | tostring + "x") | join(" | ")) + " |"' \
        "$WORK/bench-$name.json"
    local nerr
    nerr=$(jq '[.requests[] | select(.error != null and .error != "" and .error != "ok")] | length' "$WORK/bench-$name.json")
    echo
    echo "Output tokens/s over each run's makespan ($N requests, all at once); failed requests: $nerr."
    echo
    # which instance served how many requests, per policy (from the gateways' own counters)
    echo "| policy | requests per instance (0..$((k - 1))) |"
    echo "|---|---|"
    for p in "${policies[@]}"; do
        local g
        g=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$WORK/gw-$name-$p.log" | head -n1 | sed 's/^listening on //')
        echo "| $p | $(curl -s "$g/admin/upstreams" | jq -r '[.upstreams[]? // .[]? | (.requests // .dispatched // 0)] | map(tostring) | join(" / ")') |"
    done
    echo
    # CPU share of every process over the whole run (100% = one core)
    local i=0 cpus=()
    for pid in "${spids[@]}" "${gpids[@]}"; do
        cpus+=("$(awk -v a="${before[$i]}" -v b="$(cpu_ticks "$pid")" -v t="$TCK" -v w="$wall" 'BEGIN {printf "%.1f", 100 * (b - a) / t / w}')")
        i=$((i + 1))
    done
    local client
    client=$(awk -v w="$wall" '{printf "%.1f", 100 * ($1 + $2) / w}' "$WORK/time-$name")
    echo "Host CPU over the ${wall%.*} s run (% of one core): instances ${cpus[*]:0:${#spids[@]}};" \
        "gateways (${policies[*]}) ${cpus[*]:${#spids[@]}}; bench client $client;" \
        "host load average $(cut -d' ' -f1-3 /proc/loadavg)."
    echo
    for pid in "${spids[@]}" "${gpids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${spids[@]}" "${gpids[@]}"; do wait "$pid" 2>/dev/null; done
}

for c in $CLUSTERS; do
    case $c in
    pair) run_cluster pair ${PAIR_POLICIES:-capacity_aware round_robin} ;;
    four) run_cluster four ${FOUR_POLICIES:-capacity_aware round_robin least_requests weighted_round_robin} ;;
    *) die "unknown cluster $c (pair, four)" ;;
    esac
done
