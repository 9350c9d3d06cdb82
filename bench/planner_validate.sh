#!/usr/bin/env bash
# Issue 3, acceptance 2: the planner's predicted throughput against measured throughput of real
# CPU instances on this machine, for four deployments of one model (1 instance x 2 threads and
# 2 instances x 1 thread, each at two KV sizes), and whether the predicted best is the measured
# best. Prints a markdown table.
#
#   bench/planner_validate.sh                    # LOOM_BIN=build/loom by default
#   ROUNDS=3 MODEL=random:llama-125m bench/planner_validate.sh
#
# Steps: `loom profile --host` (the cpu catalog entry), `loom profile --backend cpu` at 2
# threads and at 1 thread (two 1-thread profiles run at once, as the two 1-thread instances
# will), `loom plan --profiles` for each configuration (--tp fixes the degree; the KV size comes
# from --gpu-memory-utilization of the host's per-core memory), then per configuration the
# plan's instances are started with `loom serve --num-kv-blocks KV --max-num-seqs BATCH` and
# loaded with an offline batch (`loom bench --batch`) of BATCH_FACTOR x batch requests each;
# measured = output tokens / makespan, summed over the instances. Configurations are measured
# interleaved, ROUNDS times (the machine is shared: the spread is reported).
set -uo pipefail
cd "$(dirname "$0")/.."
LOOM=${LOOM_BIN:-build/loom}
MODEL=${MODEL:-random:llama-125m}
IN=${IN:-128}
OUT=${OUT:-32}
ROUNDS=${ROUNDS:-2}
BATCH_FACTOR=${BATCH_FACTOR:-2}
UTILS=${UTILS:-"0.07 0.085"}
PROFILE_FLAGS=${PROFILE_FLAGS:-"--max-batch 32 --max-context 256 --max-prompt 512 --repeat 3"}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/loom-planval.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
log() { echo "$*" >&2; }
die() { echo "planner_validate: $*" >&2; exit 1; }

"$LOOM" profile --help >/dev/null 2>&1 || die "$LOOM has no 'profile' subcommand"
mkdir -p "$WORK/profiles"

log "== loom profile --host"
"$LOOM" profile --host --out "$WORK/host.yaml" 2>>"$WORK/log" || die "profile --host failed"
grep '^#   ' "$WORK/host.yaml" >&2
CAT="$WORK/host.yaml"

log "== loom profile --backend cpu --threads 2"
"$LOOM" profile --model "$MODEL" --backend cpu --threads 2 $PROFILE_FLAGS --catalog "$CAT" \
    --no-progress --out "$WORK/profiles/cpu-tp2.yaml" >"$WORK/profile-tp2.txt" 2>>"$WORK/log" ||
    die "profile tp2 failed: $(tail -3 "$WORK/log")"
tail -n1 "$WORK/profile-tp2.txt" >&2
log "== loom profile --backend cpu --threads 1 (two at once)"
"$LOOM" profile --model "$MODEL" --backend cpu --threads 1 $PROFILE_FLAGS --catalog "$CAT" \
    --no-progress --seed 1 --out "$WORK/cpu-tp1-b.yaml" >"$WORK/profile-tp1-b.txt" 2>>"$WORK/log" &
other=$!
PIDS+=("$other")
"$LOOM" profile --model "$MODEL" --backend cpu --threads 1 $PROFILE_FLAGS --catalog "$CAT" \
    --no-progress --out "$WORK/profiles/cpu-tp1.yaml" >"$WORK/profile-tp1.txt" 2>>"$WORK/log" ||
    die "profile tp1 failed: $(tail -3 "$WORK/log")"
wait "$other"
tail -n1 "$WORK/profile-tp1.txt" >&2

# ---- plans: one per (KV size, degree)
CONFIGS=()
declare -A PRED NINST KV BATCH THREADS
for u in $UTILS; do
    for tp in 2 1; do
        name="tp$tp-u$u"
        plan="$WORK/plan-$name.yaml"
        "$LOOM" plan --cluster data/clusters/localhost-cpu.yaml --model "$MODEL" \
            --input-len "$IN" --output-len "$OUT" --catalog "$CAT" --profiles "$WORK/profiles" \
            --tp "$tp" --gpu-memory-utilization "$u" --output "$plan" --quiet 2>>"$WORK/log" ||
            die "plan $name failed: $(tail -3 "$WORK/log")"
        CONFIGS+=("$name")
        PRED[$name]=$(awk '/^predicted:/ {p = 1; next} p && /output_tokens_per_s:/ {print $2; exit}' "$plan")
        NINST[$name]=$(grep -c '^  - machine:' "$plan")
        KV[$name]=$(awk '/kv_blocks:/ {print $2; exit}' "$plan")
        BATCH[$name]=$(awk '/max_batch:/ {print $2; exit}' "$plan")
        THREADS[$name]=$tp
        log "plan $name: ${NINST[$name]} x $tp threads, kv_blocks ${KV[$name]}, batch ${BATCH[$name]}, predicted ${PRED[$name]} out tok/s"
    done
done

# ---- measure: start the plan's instances, offline batch against each at once, stop them
measure() { # name -> prints summed output tok/s
    local name=$1 n=${NINST[$1]} i url urls=() pids=() benches=()
    for ((i = 0; i < n; i++)); do
        "$LOOM" serve --model "$MODEL" --host 127.0.0.1 --port 0 --threads "${THREADS[$name]}" \
            --num-kv-blocks "${KV[$name]}" --max-num-seqs "${BATCH[$name]}" \
            >"$WORK/serve-$name-$i.log" 2>&1 &
        pids+=($!)
        PIDS+=($!)
    done
    for ((i = 0; i < n; i++)); do
        url=""
        for _ in $(seq 600); do
            url=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$WORK/serve-$name-$i.log" | head -n1 | sed 's/^listening on //')
            [ -n "$url" ] && break
            kill -0 "${pids[$i]}" 2>/dev/null || die "serve $name exited: $(tail -3 "$WORK/serve-$name-$i.log")"
            sleep 0.1
        done
        [ -n "$url" ] || die "serve $name: no listening line"
        urls+=("$url")
    done
    local nreq=$((BATCH_FACTOR * BATCH[$name]))
    for ((i = 0; i < n; i++)); do
        "$LOOM" bench --url "${urls[$i]}" --input-len "$IN" --output-len "$OUT" --batch "$nreq" \
            --prompt-mode ids --warmup 1 --no-progress --quiet \
            --out "$WORK/bench-$name-$i.json" >/dev/null 2>>"$WORK/log" &
        benches+=($!)
    done
    local ok=1
    for b in "${benches[@]}"; do wait "$b" || ok=0; done
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    [ $ok = 1 ] || die "bench $name failed: $(tail -3 "$WORK/log")"
    local sum=0 v
    for ((i = 0; i < n; i++)); do
        v=$(jq '.output_throughput' "$WORK/bench-$name-$i.json")
        sum=$(awk -v a="$sum" -v b="$v" 'BEGIN {print a + b}')
    done
    echo "$sum"
}

declare -A MEAS
for ((r = 1; r <= ROUNDS; r++)); do
    for name in "${CONFIGS[@]}"; do
        v=$(measure "$name") || exit 1
        MEAS[$name]="${MEAS[$name]:-} $v"
        log "round $r $name: $v out tok/s"
    done
done

# ---- table
echo "| configuration | instances x threads | KV blocks / instance | batch | predicted out tok/s | measured out tok/s (median; min-max of $ROUNDS) | difference |"
echo "|---|---|---:|---:|---:|---:|---:|"
best_pred="" best_meas="" bp=0 bm=0 worst=0
for name in "${CONFIGS[@]}"; do
    read -r med lo hi < <(echo ${MEAS[$name]} | tr ' ' '\n' | sort -g |
        awk '{v[NR] = $1} END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR]}')
    diff=$(awk -v p="${PRED[$name]}" -v m="$med" 'BEGIN {printf "%+.1f", 100 * (p - m) / m}')
    printf '| %s | %d x %d | %s | %s | %.1f | %.1f (%.1f-%.1f) | %s%% |\n' "$name" "${NINST[$name]}" \
        "${THREADS[$name]}" "${KV[$name]}" "${BATCH[$name]}" "${PRED[$name]}" "$med" "$lo" "$hi" "$diff"
    if awk -v a="${PRED[$name]}" -v b="$bp" 'BEGIN {exit !(a > b)}'; then bp=${PRED[$name]}; best_pred=$name; fi
    if awk -v a="$med" -v b="$bm" 'BEGIN {exit !(a > b)}'; then bm=$med; best_meas=$name; fi
    worst=$(awk -v w="$worst" -v d="$diff" 'BEGIN {d = d < 0 ? -d : d; print (d > w ? d : w)}')
done
echo
echo "predicted best: $best_pred; measured best: $best_meas; largest |difference|: $worst%"
echo "profiles: tp2 $(tail -n1 "$WORK/profile-tp2.txt" | sed 's/.*relative RMS error/fit error/'), tp1 $(tail -n1 "$WORK/profile-tp1.txt" | sed 's/.*relative RMS error/fit error/')"
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/; fi
