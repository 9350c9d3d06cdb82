#!/usr/bin/env bash
# Issue 3, acceptance 3: emulated accelerators. (a) An emulated H100 and an emulated V100
# instance under a saturating offline batch deliver the throughput the performance model
# predicts (within 5%); (b) 8 emulated instances (4 H100 + 4 V100) run together on this machine
# without the host CPU becoming the bottleneck: each instance's throughput together vs alone,
# and the CPU each server and the load generator used. Prints markdown tables.
#
#   bench/emulated_validate.sh                        # LOOM_BIN=build/loom by default
#   MODEL=random:llama-1b IN=512 OUT=128 FACTOR=4 bench/emulated_validate.sh
#
# Prediction: `loom plan` on a one-device cluster of each kind (tp 1): its kv_blocks and
# max_batch start the instance (--num-kv-blocks, --max-num-seqs), its output tok/s is the
# prediction (perf_estimate_instance, what --explain prints). Measured: `loom bench --batch N`
# (N = FACTOR x batch), output tokens/s (1) in the steady window — from the first request's end
# (the first wave done) to the last request's first token (the last wave started): the steady
# state the model describes — and (2) over the whole makespan (ramp-up and drain included).
# CPU: utime + stime from /proc/PID/stat of each server over the run, and of the bench client.
set -uo pipefail
cd "$(dirname "$0")/.."
LOOM=${LOOM_BIN:-build/loom}
MODEL=${MODEL:-random:llama-1b}
IN=${IN:-512}
OUT=${OUT:-128}
FACTOR=${FACTOR:-4}
DEVICES=${DEVICES:-"H100-80G V100-32G"}
GROUP=${GROUP:-4} # instances of each device in the together run
WORK=$(mktemp -d "${TMPDIR:-/tmp}/loom-emuval.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
log() { echo "$*" >&2; }
die() { echo "emulated_validate: $*" >&2; exit 1; }
TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

declare -A PRED KV BATCH
for dev in $DEVICES; do
    printf 'machines:\n  - {name: one, device: %s, count: 1}\n' "$dev" >"$WORK/cluster-$dev.yaml"
    "$LOOM" plan --cluster "$WORK/cluster-$dev.yaml" --model "$MODEL" --input-len "$IN" \
        --output-len "$OUT" --tp 1 --output "$WORK/plan-$dev.yaml" --quiet 2>>"$WORK/log" ||
        die "plan $dev: $(tail -2 "$WORK/log")"
    PRED[$dev]=$(awk '/^predicted:/ {p = 1; next} p && /output_tokens_per_s:/ {print $2; exit}' "$WORK/plan-$dev.yaml")
    KV[$dev]=$(awk '/kv_blocks:/ {print $2; exit}' "$WORK/plan-$dev.yaml")
    BATCH[$dev]=$(awk '/max_batch:/ {print $2; exit}' "$WORK/plan-$dev.yaml")
    log "plan $dev: kv_blocks ${KV[$dev]}, batch ${BATCH[$dev]}, predicted ${PRED[$dev]} out tok/s"
done
NREQ=0
for dev in $DEVICES; do
    n=$((FACTOR * BATCH[$dev]))
    [ "$n" -gt "$NREQ" ] && NREQ=$n
done

# start NAME DEVICE: sets URL_<NAME>, PID_<NAME>
start() {
    local name=$1 dev=$2 url=""
    "$LOOM" serve --backend emulated --device "$dev" --model "$MODEL" --host 127.0.0.1 --port 0 \
        --num-kv-blocks "${KV[$dev]}" --max-num-seqs "${BATCH[$dev]}" >"$WORK/serve-$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 300); do
        url=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$WORK/serve-$name.log" | head -n1 | sed 's/^listening on //')
        [ -n "$url" ] && break
        kill -0 "$pid" 2>/dev/null || die "serve $name exited: $(tail -2 "$WORK/serve-$name.log")"
        sleep 0.1
    done
    [ -n "$url" ] || die "serve $name: no listening line"
    printf -v "URL_$name" '%s' "$url"
    printf -v "PID_$name" '%s' "$pid"
}

# steady JSON TARGET -> "steady_tok_s whole_tok_s"
rates() {
    jq -r --argjson t "$2" '
        [.requests[] | select(.target == $t and (.error == null or .error == "ok"))] as $r
        | ($r | map(.end_s) | min) as $a
        | ($r | map(.start_s + .ttft_s) | max) as $b
        | ($r | map(.end_s) | max) as $last
        | ($r | map(.start_s) | min) as $begin
        | ([$r[] | (.start_s + .ttft_s) as $f | ([foreach .itl_s[] as $g ($f; . + $g)] + [$f])[]
            | select(. > $a and . <= $b)] | length) as $steady
        | ($r | map(.output_tokens) | add) as $all
        | "\(if $b > $a then $steady / ($b - $a) else $all / ($last - $begin) end) \($all / ($last - $begin))"' "$1"
}

# run LABEL NAMES...: one bench over every named instance at once (--interleave requests)
run() {
    local label=$1
    shift
    local args=() name before=() t0 t1
    for name in "$@"; do
        local u="URL_$name"
        args+=(--url "${!u}")
    done
    for name in "$@"; do
        local p="PID_$name"
        before+=("$(cpu_ticks "${!p}")")
    done
    t0=$(date +%s.%N)
    /usr/bin/time -f '%U %S' -o "$WORK/time-$label" "$LOOM" bench "${args[@]}" --interleave requests \
        --input-len "$IN" --output-len "$OUT" --batch "$NREQ" --prompt-mode ids --no-progress --quiet \
        --out "$WORK/bench-$label.json" >/dev/null 2>>"$WORK/log" || die "bench $label: $(tail -2 "$WORK/log")"
    t1=$(date +%s.%N)
    local i=0
    for name in "$@"; do
        local p="PID_$name"
        local cpu
        cpu=$(awk -v a="${before[$i]}" -v b="$(cpu_ticks "${!p}")" -v t="$TCK" -v w="$(awk -v x="$t0" -v y="$t1" 'BEGIN {print y - x}')" \
            'BEGIN {printf "%.1f", 100 * (b - a) / t / w}')
        echo "$label $name $i $(rates "$WORK/bench-$label.json" "$i") $cpu" >>"$WORK/results"
        i=$((i + 1))
    done
    local client
    client=$(awk -v w="$(awk -v x="$t0" -v y="$t1" 'BEGIN {print y - x}')" '{printf "%.1f", 100 * ($1 + $2) / w}' "$WORK/time-$label")
    echo "$label client $client" >>"$WORK/client"
}

# ---- (a) each device alone
for dev in $DEVICES; do
    name=${dev//-/_}_alone
    start "$name" "$dev"
    log "== $dev alone, $NREQ requests of $IN + $OUT tokens"
    run "alone-$dev" "$name"
    kill -TERM "$(eval echo \$PID_$name)"
done

# ---- (b) GROUP of each device together
together=()
for dev in $DEVICES; do
    for ((k = 0; k < GROUP; k++)); do
        name=${dev//-/_}_$k
        start "$name" "$dev"
        together+=("$name")
    done
done
log "== ${#together[@]} instances together"
run together "${together[@]}"

# ---- tables
echo "Model $MODEL, offline batch of $NREQ requests of $IN prompt + $OUT output tokens per instance."
echo
echo "| emulated device | KV blocks | batch | predicted out tok/s | measured, steady window | difference | measured, whole run | difference | server CPU |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for dev in $DEVICES; do
    read -r _ _ _ steady whole cpu < <(grep "^alone-$dev " "$WORK/results")
    awk -v d="$dev" -v kv="${KV[$dev]}" -v b="${BATCH[$dev]}" -v p="${PRED[$dev]}" -v s="$steady" -v w="$whole" -v c="$cpu" \
        'BEGIN {printf "| %s, tp 1 | %d | %d | %.0f | %.0f | %+.1f%% | %.0f | %+.1f%% | %s%% of a core |\n", d, kv, b, p, s, 100 * (s - p) / p, w, 100 * (w - p) / p, c}'
done
echo
echo "All $((${#together[@]})) together (one load generator, every request sent to every instance at once):"
echo
echo "| instance | predicted | alone, steady | together, steady | together / alone | server CPU |"
echo "|---|---:|---:|---:|---:|---:|"
while read -r _ name _ steady _ cpu; do
    dev=${name%_*}
    dev=${dev//_/-}
    alone=$(awk -v d="alone-$dev" '$1 == d {print $4}' "$WORK/results")
    awk -v n="$name" -v p="${PRED[$dev]}" -v a="$alone" -v s="$steady" -v c="$cpu" \
        'BEGIN {printf "| %s | %.0f | %.0f | %.0f | %.3f | %s%% of a core |\n", n, p, a, s, s / a, c}'
done < <(grep '^together ' "$WORK/results")
echo
total_cpu=$(awk '$1 == "together" {s += $6} END {printf "%.0f", s}' "$WORK/results")
echo "Host CPU during the together run: servers $total_cpu% of one core in all, load generator $(awk '$1 == "together" {print $3}' "$WORK/client")% (the host has $(nproc) cores = $(($(nproc) * 100))%)."
echo "Alone runs, load generator: $(awk '$1 != "together" {printf "%s %s%%; ", $1, $3}' "$WORK/client")"
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/; fi
