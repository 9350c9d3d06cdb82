#!/usr/bin/env bash
# Issue 3, acceptance 2: the planner's predicted throughput against measured throughput of real
# CPU instances on this machine, for four deployments of one model (1 instance x THREADS_BIG
# threads and THREADS_BIG/THREADS_SMALL instances x THREADS_SMALL threads, each at two KV
# sizes), and whether the predicted best is the measured best. Prints a markdown table.
#
#   bench/planner_validate.sh                             # LOOM_BIN=build/loom, 1x2 and 2x1
#   THREADS_BIG=8 THREADS_SMALL=4 ROUNDS=3 bench/planner_validate.sh   # 1x8 and 2x4
#   PROFILE=engine bench/planner_validate.sh              # in-process profiles (no HTTP)
#
# Steps: `loom profile --host` (the cpu catalog entry); per thread count a profile: by default
# through live servers (`loom serve` + `loom profile --url`, PROFILE=url), so the per-token cost
# of serving (HTTP, SSE) that shares the cores is in it, with as many instances profiled at once
# as the configuration runs; PROFILE=engine times engine steps in process instead. The decode
# grid reaches the workload's contexts (--max-context IN+OUT). Then `loom plan --profiles` for
# each configuration (--tp fixes the degree; the KV size comes from --gpu-memory-utilization of
# the host's per-core memory: UTILS), and per configuration the plan's instances are started
# with `loom serve --num-kv-blocks KV --max-num-seqs BATCH` and loaded by one `loom bench`
# with an offline batch of BATCH_FACTOR x batch requests per instance (every request to every
# instance at once); measured = per instance output tokens / its makespan, summed. The
# configurations are measured interleaved (A B C D, A B C D, ...), ROUNDS times; the table
# shows the median and the spread. Needs python3 (for the JSON), not jq.
set -uo pipefail
cd "$(dirname "$0")/.."
LOOM=${LOOM_BIN:-build/loom}
MODEL=${MODEL:-random:llama-125m}
IN=${IN:-128}
OUT=${OUT:-32}
ROUNDS=${ROUNDS:-3}
BATCH_FACTOR=${BATCH_FACTOR:-2}
UTILS=${UTILS:-"0.07 0.085"}
THREADS_BIG=${THREADS_BIG:-2}
THREADS_SMALL=${THREADS_SMALL:-1}
PROFILE=${PROFILE:-url}
# the decode grid must reach the batches the plans will use (72 and 104 for 1 x 2 threads here):
# fitted on batches <= 32 the CPU decode slope is too steep beyond them (predictions 11-24% low)
MAX_BATCH=${MAX_BATCH:-128}
PROFILE_FLAGS=${PROFILE_FLAGS:-"--max-batch $MAX_BATCH --max-context $((IN + OUT)) --max-prompt $((4 * IN)) --repeat 5"}
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
command -v python3 >/dev/null || die "python3 is needed to read loom bench's JSON"
[ $((THREADS_BIG % THREADS_SMALL)) = 0 ] || die "THREADS_SMALL must divide THREADS_BIG"
NSMALL=$((THREADS_BIG / THREADS_SMALL))
mkdir -p "$WORK/profiles"
printf 'machines:\n  - {name: localhost, device: cpu, count: %d, host: 127.0.0.1}\n' \
    "$THREADS_BIG" >"$WORK/cluster.yaml"

log "== loom profile --host"
"$LOOM" profile --host --out "$WORK/host.yaml" 2>>"$WORK/log" || die "profile --host failed"
grep '^#   ' "$WORK/host.yaml" >&2
CAT="$WORK/host.yaml"

# serve NAME THREADS [flags...]: starts `loom serve`, sets SERVE_URL and SERVE_PID
serve() {
    local name=$1 threads=$2 url=""
    shift 2
    "$LOOM" serve --model "$MODEL" --host 127.0.0.1 --port 0 --threads "$threads" "$@" \
        >"$WORK/serve-$name.log" 2>&1 &
    SERVE_PID=$!
    PIDS+=("$SERVE_PID")
    for _ in $(seq 600); do
        url=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$WORK/serve-$name.log" | head -n1 | sed 's/^listening on //')
        [ -n "$url" ] && break
        kill -0 "$SERVE_PID" 2>/dev/null || die "serve $name exited: $(tail -3 "$WORK/serve-$name.log")"
        sleep 0.1
    done
    [ -n "$url" ] || die "serve $name: no listening line"
    SERVE_URL=$url
}

# profile THREADS COUNT: COUNT instances of THREADS threads profiled at once (as the
# configuration runs them); the first one's profile is kept
profile() {
    local t=$1 count=$2 k pids=() spids=() out
    for ((k = 0; k < count; k++)); do
        out="$WORK/profiles/cpu-tp$t.yaml"
        [ "$k" -gt 0 ] && out="$WORK/extra-tp$t-$k.yaml"
        if [ "$PROFILE" = url ]; then
            serve "prof-tp$t-$k" "$t" --max-num-seqs "$MAX_BATCH" --seed "$k"
            spids+=("$SERVE_PID")
            "$LOOM" profile --url "$SERVE_URL" --model "$MODEL" --device cpu --tp "$t" \
                $PROFILE_FLAGS --catalog "$CAT" --seed "$k" --no-progress --out "$out" \
                >"$WORK/profile-tp$t-$k.txt" 2>>"$WORK/log" &
        else
            "$LOOM" profile --model "$MODEL" --backend cpu --threads "$t" $PROFILE_FLAGS \
                --catalog "$CAT" --seed "$k" --no-progress --out "$out" \
                >"$WORK/profile-tp$t-$k.txt" 2>>"$WORK/log" &
        fi
        pids+=($!)
        PIDS+=($!)
    done
    local ok=1
    for p in "${pids[@]}"; do wait "$p" || ok=0; done
    for p in "${spids[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    [ $ok = 1 ] || die "profile tp$t failed: $(tail -3 "$WORK/log")"
    grep -h 'fit error would be' "$WORK/profile-tp$t-0.txt" >&2
    tail -n1 "$WORK/profile-tp$t-0.txt" >&2
}
log "== profile ($PROFILE) at $THREADS_BIG threads"
profile "$THREADS_BIG" 1
log "== profile ($PROFILE) at $THREADS_SMALL threads, $NSMALL at once"
profile "$THREADS_SMALL" "$NSMALL"

# ---- plans: one per (KV size, degree)
CONFIGS=()
declare -A PRED NINST KV BATCH THREADS
for u in $UTILS; do
    for tp in "$THREADS_BIG" "$THREADS_SMALL"; do
        name="tp$tp-u$u"
        plan="$WORK/plan-$name.yaml"
        "$LOOM" plan --cluster "$WORK/cluster.yaml" --model "$MODEL" \
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

# ---- measure: start the plan's instances, one offline batch over all of them, stop them
measure() { # name round -> prints summed output tok/s
    local name=$1 round=$2 n=${NINST[$1]} i pids=() urls=()
    for ((i = 0; i < n; i++)); do
        serve "$name-$round-$i" "${THREADS[$name]}" --num-kv-blocks "${KV[$name]}" \
            --max-num-seqs "${BATCH[$name]}"
        pids+=("$SERVE_PID")
        urls+=(--url "$SERVE_URL")
    done
    local nreq=$((BATCH_FACTOR * BATCH[$name])) json="$WORK/bench-$name-$round.json"
    "$LOOM" bench "${urls[@]}" --interleave requests --input-len "$IN" --output-len "$OUT" \
        --batch "$nreq" --prompt-mode ids --warmup 1 --no-progress --quiet --out "$json" \
        >/dev/null 2>>"$WORK/log"
    local rc=$?
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    [ $rc = 0 ] || die "bench $name failed: $(tail -3 "$WORK/log")"
    python3 - "$json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
by = {}
for q in r["requests"]:
    if q.get("error") not in (None, "ok"):
        continue
    t = by.setdefault(q["target"], [1e300, 0.0, 0])
    t[0] = min(t[0], q["start_s"])
    t[1] = max(t[1], q["end_s"])
    t[2] += q["output_tokens"]
print("%.3f" % sum(tok / (end - start) for start, end, tok in by.values() if end > start))
EOF
}

declare -A MEAS
for ((r = 1; r <= ROUNDS; r++)); do
    for name in "${CONFIGS[@]}"; do
        v=$(measure "$name" "$r") || exit 1
        MEAS[$name]="${MEAS[$name]:-} $v"
        log "round $r $name: $v out tok/s"
    done
done

# ---- table
echo "Model $MODEL, $IN + $OUT tokens, host $(nproc) cores; profiles: $PROFILE; $ROUNDS interleaved rounds."
echo
echo "| configuration | instances x threads | KV blocks / instance | batch | predicted out tok/s | measured out tok/s, median (min-max) | spread | difference |"
echo "|---|---|---:|---:|---:|---:|---:|---:|"
best_pred="" best_meas="" bp=0 bm=0 worst=0
for name in "${CONFIGS[@]}"; do
    read -r med lo hi < <(echo ${MEAS[$name]} | tr ' ' '\n' | sort -g |
        awk '{v[NR] = $1} END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR]}')
    diff=$(awk -v p="${PRED[$name]}" -v m="$med" 'BEGIN {printf "%+.1f", 100 * (p - m) / m}')
    spread=$(awk -v m="$med" -v a="$lo" -v b="$hi" 'BEGIN {printf "%.0f", 100 * (b - a) / m}')
    printf '| %s | %d x %d | %s | %s | %.1f | %.1f (%.1f-%.1f) | %s%% | %s%% |\n' "$name" "${NINST[$name]}" \
        "${THREADS[$name]}" "${KV[$name]}" "${BATCH[$name]}" "${PRED[$name]}" "$med" "$lo" "$hi" "$spread" "$diff"
    if awk -v a="${PRED[$name]}" -v b="$bp" 'BEGIN {exit !(a > b)}'; then bp=${PRED[$name]}; best_pred=$name; fi
    if awk -v a="$med" -v b="$bm" 'BEGIN {exit !(a > b)}'; then bm=$med; best_meas=$name; fi
    worst=$(awk -v w="$worst" -v d="$diff" 'BEGIN {d = d < 0 ? -d : d; print (d > w ? d : w)}')
done
echo
echo "predicted best: $best_pred; measured best: $best_meas; largest |difference|: $worst%"
for t in "$THREADS_BIG" "$THREADS_SMALL"; do
    echo "profile tp$t: $(tail -n1 "$WORK/profile-tp$t-0.txt" | sed 's/.*: overhead/overhead/'); $(grep -h -o 'fit error would be [0-9.]*%' "$WORK/profile-tp$t-0.txt" | sed 's/fit error would be/without the attention and per-token terms/')"
done
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/; fi
