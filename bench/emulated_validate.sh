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
# (N = FACTOR x batch), non-streaming by default (NO_STREAM=0 streams: the per-token SSE work of
# server and client is then part of what is measured), output tokens/s (1) in the steady window
# -- completions from the first request's end (the first wave done) to the last end less the
# same ramp (the drain): the steady state the model describes -- and (2) over the whole makespan
# (ramp-up and drain included).
# CPU: a sampler reads utime + stime from /proc/PID/stat of every server and of the load
# generator, and the host's busy time from /proc/stat, every 0.5 s; the together table reports
# them over the window in which all instances are serving (until the first instance finishes),
# not over the whole run (the fast instances finish long before the slow ones). Needs python3.
set -uo pipefail
cd "$(dirname "$0")/.."
LOOM=${LOOM_BIN:-build/loom}
MODEL=${MODEL:-random:llama-1b}
IN=${IN:-512}
OUT=${OUT:-128}
FACTOR=${FACTOR:-4}
DEVICES=${DEVICES:-"H100-80G V100-32G"}
GROUP=${GROUP:-4} # instances of each device in the together run
NO_STREAM=${NO_STREAM:-1}
STREAM_FLAG=()
[ "$NO_STREAM" = 1 ] && STREAM_FLAG=(--no-stream)
command -v python3 >/dev/null || { echo "emulated_validate: needs python3" >&2; exit 1; }
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

# rates JSON TARGET -> "steady_tok_s whole_tok_s"
rates() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
r = [q for q in json.load(open(sys.argv[1]))["requests"]
     if q["target"] == int(sys.argv[2]) and q.get("error") in (None, "ok")]
begin = min(q["start_s"] for q in r)
ends = sorted(q["end_s"] for q in r)
allt = sum(q["output_tokens"] for q in r)
a = ends[0]
b = ends[-1] - (a - begin)  # the drain is as long as the ramp
steady = sum(q["output_tokens"] for q in r if a < q["end_s"] <= b)
whole = allt / (ends[-1] - begin)
print("%.1f %.1f" % (steady / (b - a) if b > a else whole, whole))
EOF
}

# sampler FILE PIDS...: every 0.5 s "time host_busy host_all pid:ticks ..." until killed
sampler() {
    local f=$1
    shift
    while :; do
        local line p
        line="$(date +%s.%N) $(awk '/^cpu / {b = $2 + $3 + $4 + $7 + $8; print b, b + $5 + $6; exit}' /proc/stat)"
        for p in "$@"; do line+=" $p:$(cpu_ticks "$p")"; done
        echo "$line" >>"$f"
        sleep 0.5
    done
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
    local spids=()
    for name in "$@"; do
        local p="PID_$name"
        spids+=("${!p}")
    done
    t0=$(date +%s.%N)
    "$LOOM" bench "${args[@]}" --interleave requests "${STREAM_FLAG[@]}" \
        --input-len "$IN" --output-len "$OUT" --batch "$NREQ" --prompt-mode ids --no-progress --quiet \
        --out "$WORK/bench-$label.json" >/dev/null 2>>"$WORK/log" &
    local bpid=$!
    sampler "$WORK/cpu-$label" "${spids[@]}" "$bpid" &
    local sp=$!
    wait "$bpid" || { kill "$sp"; die "bench $label: $(tail -2 "$WORK/log")"; }
    kill "$sp" 2>/dev/null
    wait "$sp" 2>/dev/null
    t1=$(date +%s.%N)
    # CPU over the window in which every instance serves: bench start .. first instance done
    python3 - "$WORK/cpu-$label" "$WORK/bench-$label.json" "$t0" "$TCK" "$bpid" "${spids[@]}" \
        >"$WORK/cpuwin-$label" <<'EOF'
import json, sys
f, js, t0, tck, bpid = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
servers = sys.argv[6:]
last = {}
for q in json.load(open(js))["requests"]:
    last[q["target"]] = max(last.get(q["target"], 0), q["end_s"])
t_end = t0 + min(last.values())
rows = []
for line in open(f):
    p = line.split()
    rows.append((float(p[0]), float(p[1]), float(p[2]), dict(x.split(":") for x in p[3:])))
win = [r for r in rows if r[0] <= t_end] or rows[:2]
a, b = rows[0], win[-1]
dt = max(b[0] - a[0], 1e-9)
pct = lambda pid: 100 * (float(b[3].get(pid, 0)) - float(a[3].get(pid, 0))) / tck / dt
print("window %.1f" % dt)
print("host %.1f" % (100 * (b[1] - a[1]) / max(b[2] - a[2], 1e-9)))
print("client %.1f" % pct(bpid))
for s in servers:
    print("server %s %.1f" % (s, pct(s)))
EOF
    local i=0
    for name in "$@"; do
        local p="PID_$name"
        local cpu
        cpu=$(awk -v a="${before[$i]}" -v b="$(cpu_ticks "${!p}")" -v t="$TCK" -v w="$(awk -v x="$t0" -v y="$t1" 'BEGIN {print y - x}')" \
            'BEGIN {printf "%.1f", 100 * (b - a) / t / w}')
        local wcpu
        wcpu=$(awk -v p="${!p}" '$1 == "server" && $2 == p {print $3}' "$WORK/cpuwin-$label")
        echo "$label $name $i $(rates "$WORK/bench-$label.json" "$i") $cpu $wcpu" >>"$WORK/results"
        i=$((i + 1))
    done
    # label client_cpu host_busy window_s (over the all-serving window)
    echo "$label $(awk '$1 == "client" {c = $2} $1 == "host" {h = $2} $1 == "window" {w = $2} END {print c, h, w}' "$WORK/cpuwin-$label")" >>"$WORK/client"
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
echo "| instance | predicted | alone, steady | together, steady | together / alone | server CPU, whole run | server CPU, all serving |"
echo "|---|---:|---:|---:|---:|---:|---:|"
while read -r _ name _ steady _ cpu wcpu; do
    dev=${name%_*}
    dev=${dev//_/-}
    alone=$(awk -v d="alone-$dev" '$1 == d {print $4}' "$WORK/results")
    awk -v n="$name" -v p="${PRED[$dev]}" -v a="$alone" -v s="$steady" -v c="$cpu" -v w="$wcpu" \
        'BEGIN {printf "| %s | %.0f | %.0f | %.0f | %.3f | %s%% of a core | %s%% of a core |\n", n, p, a, s, s / a, c, w}'
done < <(grep '^together ' "$WORK/results")
echo
total_cpu=$(awk '$1 == "together" {s += $7} END {printf "%.0f", s}' "$WORK/results")
read -r _ ccpu hbusy win < <(grep '^together ' "$WORK/client")
echo "While all $((${#together[@]})) served (${win} s): servers $total_cpu% of one core in all, load generator ${ccpu}%, host busy ${hbusy}% of its $(nproc) cores (every process, ours and others')."
echo "Alone runs (load generator CPU, host busy): $(awk '$1 != "together" {printf "%s %s%%, %s%%; ", $1, $2, $3}' "$WORK/client")"
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/; fi
