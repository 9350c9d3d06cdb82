#!/usr/bin/env bash
# Issue 5, acceptance 3: capacity_aware against the baselines on a heterogeneous cluster of REAL
# compute: CPU instances of one model with different thread counts (`loom serve --backend cpu
# --threads T`), each pinned to its own cores (taskset) when the host has enough, one `loom
# gateway` per policy in front of the same instances, `loom bench` as the client. Prints two
# markdown tables to stdout (docs/heterogeneous.md, "Real CPU instances", holds a run's):
#   1. per policy: output tokens/s of the same offline batch (median and min-max over ROUNDS),
#      the ratio to round_robin, requests per instance;
#   2. per instance: the planner's predicted capacity (from a latency profile of that thread
#      count, `loom profile`, fed to `loom plan --profiles`) beside the tokens/s it delivers
#      alone under a saturating batch.
#
#   bench/hetero_cpu.sh                                   # 8/4/2/1 threads; needs 16 cores
#   THREADS="1 1" ROUNDS=1 SMALL=1 bench/hetero_cpu.sh    # smoke test on 2 cores
#
# Steps:
#   1. workload: the first N requests of the Azure 2023 conversation trace, prompt lengths / IN_DIV
#      (at most MAX_IN) and output lengths / OUT_DIV (at most MAX_OUT), so that a CPU runs it in
#      seconds; written as a trace of its own.
#   2. instances: `loom serve --backend cpu --threads T --max-num-seqs MAX_SEQS --num-kv-blocks
#      KV_BLOCKS --no-enable-prefix-caching` (prefix caching off: every policy sends the same
#      prompts in a round, and a later policy must not find them cached by an earlier one).
#   3. profiles, once per distinct thread count, in parallel when pinned (PROFILES=DIR reuses):
#      PROFILE=url (default) `loom profile --url` through the first instance of that count, so
#      the server's per-token work (HTTP, SSE, the engine thread's hand-offs) is in the fit;
#      PROFILE=engine `loom profile --backend cpu --threads T` in process, on that instance's
#      cores (faster, but it times engine steps only: it over-predicted the served rates by
#      10-20% on the 16-core host, docs/heterogeneous.md).
#   4. plan: `loom plan --profiles DIR --max-num-seqs MAX_SEQS` for a machine of max(THREADS)
#      cores; its table gives, per degree T, the batch and the predicted prefill, decode and
#      output tokens/s (from T's profile); one plan.yaml is written with an instance per
#      THREADS entry, in order, each with the KV blocks it is started with (KV_BLOCKS).
#   5. alone: each instance, directly (no gateway), an offline batch of N_ALONE requests
#      (4 x MAX_SEQS, every (N / N_ALONE)-th request of the batch, so their lengths are drawn
#      like the batch's), one instance at a time. Its capacity is the output tokens/s while it
#      runs a full batch (from the start until the queue is empty and the (N_ALONE - MAX_SEQS +
#      1)-th request finishes; each token placed at its time from the stream), which is what
#      the planner's steady-state estimate describes; the rate over the whole makespan, tail
#      included, is shown beside it. The predicted column comes from a second `loom plan` over
#      this alone workload (the gateways' plan is over the whole batch).
#   6. policies: one gateway per policy, all given the plan (`--plan plan.yaml --upstream URL
#      ...`: capacity_aware starts from the plan's prefill/decode rates and KV sizes,
#      weighted_round_robin weighs by predicted output tokens/s; round_robin and least_requests
#      use neither), then `loom bench --batch N --rounds ROUNDS --interleave runs` through them
#      (A B C D A B C D ...), the same prompts for every policy within a round.
#
# Pinning (PIN=auto): with taskset and at least sum(THREADS) + 1 usable CPUs, instance k gets
# its own consecutive CPUs after the first (an engine profile of its thread count runs there);
# the gateways, the bench client and url profiles' clients run on the first CPU and any left
# over. Otherwise nothing is pinned (said in
# the output). Needs python3 (for reading the bench's JSON); not jq.
#
# Knobs (environment): THREADS, MODEL (random:llama-125m), N (128), ROUNDS (4), MAX_SEQS (8),
# N_ALONE (4 x MAX_SEQS), IN_DIV (16), OUT_DIV (4), MAX_IN (256), MAX_OUT (128), KV_BLOCKS (2048),
# POLICIES, PROFILE (url|engine), PROFILES (a directory of profiles to reuse), PIN (auto|0),
# LOOM_BIN (build/loom),
# TRACE, KEEP (a directory: the work files are copied there). SMALL=1 shrinks everything for a
# smoke test (N 12, ROUNDS 1, MAX_SEQS 4, lengths / 16 and / 8, a smaller profiling grid).
#
# Sized for <= 8 minutes on a 16-core host: on one of the H200 machines (16 vCPUs, AVX-512)
# these defaults took 320 s in all (url profiles 28 s, the alone runs 42 s).
set -uo pipefail
cd "$(dirname "$0")/.."
LOOM=${LOOM_BIN:-build/loom}
TRACE=${TRACE:-../shared/data/traces/azure2023_conv.csv}
THREADS=${THREADS:-"8 4 2 1"}
MODEL=${MODEL:-random:llama-125m}
SMALL=${SMALL:-0}
if [ "$SMALL" = 1 ]; then
    N=${N:-12} ROUNDS=${ROUNDS:-1} MAX_SEQS=${MAX_SEQS:-4} IN_DIV=${IN_DIV:-16} OUT_DIV=${OUT_DIV:-8}
    MAX_IN=${MAX_IN:-128} MAX_OUT=${MAX_OUT:-32}
    GRID=(--max-prompt 128 --max-batch 4 --max-context 128 --repeat 1)
else
    N=${N:-128} ROUNDS=${ROUNDS:-4} MAX_SEQS=${MAX_SEQS:-8} IN_DIV=${IN_DIV:-16} OUT_DIV=${OUT_DIV:-4}
    MAX_IN=${MAX_IN:-256} MAX_OUT=${MAX_OUT:-128}
    GRID=(--max-prompt 128 --max-batch "$MAX_SEQS" --max-context 128 --repeat 2)
fi
N_ALONE=${N_ALONE:-$((4 * MAX_SEQS))}
KV_BLOCKS=${KV_BLOCKS:-2048}
POLICIES=${POLICIES:-"capacity_aware round_robin least_requests weighted_round_robin"}
PIN=${PIN:-auto}
PROFILE=${PROFILE:-url}
[ "$PROFILE" = url ] || [ "$PROFILE" = engine ] || { echo "hetero_cpu: PROFILE is url or engine" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/loom-hetero-cpu.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM INT # a killed run still cleans up (and KEEPs what it has)
log() { echo "hetero_cpu: $*" >&2; }
die() { echo "hetero_cpu: $*" >&2; exit 1; }
T_START=$(date +%s.%N)
elapsed() { awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN {printf "%.0f", b - a}'; }
[ -x "$LOOM" ] || die "no $LOOM (make first, or LOOM_BIN=...)"
[ -r "$TRACE" ] || die "no trace $TRACE"
command -v python3 >/dev/null || die "python3 is needed to read the bench's JSON"

read -r -a TH <<<"$THREADS"
K=${#TH[@]}
[ "$K" -ge 2 ] || die "THREADS needs at least two instances (got '$THREADS')"
SUM=0
for t in "${TH[@]}"; do
    [[ "$t" =~ ^[1-9][0-9]*$ ]] || die "bad thread count '$t' in THREADS"
    SUM=$((SUM + t))
done

# ---------------------------------------------------------------- pinning
read -r -a CPUS <<<"$(python3 -c 'import os; print(" ".join(map(str, sorted(os.sched_getaffinity(0)))))')"
NCPU=${#CPUS[@]}
PINNED=0
if [ "$PIN" != 0 ] && command -v taskset >/dev/null && [ "$NCPU" -ge $((SUM + 1)) ]; then
    PINNED=1
fi
INST_CPUS=() # per instance: "a,b,c"
CLIENT_CPUS=""
if [ "$PINNED" = 1 ]; then
    off=1
    for t in "${TH[@]}"; do
        INST_CPUS+=("$(IFS=,; echo "${CPUS[*]:off:t}")")
        off=$((off + t))
    done
    rest=("${CPUS[0]}" "${CPUS[@]:off}")
    CLIENT_CPUS=$(IFS=,; echo "${rest[*]}")
else
    for _ in "${TH[@]}"; do INST_CPUS+=(""); done
fi
# pinned CPUS CMD...: runs CMD on those CPUs (or anywhere when not pinned)
pinned() {
    local cpus=$1
    shift
    if [ -n "$cpus" ]; then taskset -c "$cpus" "$@"; else "$@"; fi
}

source bench/lib.sh # wait_line (the working directory is the repository root)


# ---------------------------------------------------------------- 1. workload
NT=$((N > N_ALONE ? N : N_ALONE))
awk -F, -v n="$NT" -v di="$IN_DIV" -v do_="$OUT_DIV" -v mi="$MAX_IN" -v mo="$MAX_OUT" '
    { sub(/\r$/, "") } # the trace has CRLF line ends
    NR == 1 { for (i = 1; i <= NF; i++) { if ($i == "ContextTokens") ci = i; if ($i == "GeneratedTokens") go = i }
              print "TIMESTAMP,ContextTokens,GeneratedTokens"; next }
    NR > n + 1 { exit }
    { p = int($ci / di + 0.5); if (p < 4) p = 4; if (p > mi) p = mi
      o = int($go / do_ + 0.5); if (o < 2) o = 2; if (o > mo) o = mo
      print $1 "," p "," o }
    END { if (!ci || !go) { print "no ContextTokens/GeneratedTokens columns" >"/dev/stderr"; exit 1 } }' \
    "$TRACE" >"$WORK/all.csv" || die "cannot read $TRACE"
[ "$(wc -l <"$WORK/all.csv")" -gt "$N" ] || die "the trace has fewer than $N requests"
head -n $((N + 1)) "$WORK/all.csv" >"$WORK/batch.csv"
if [ "$N_ALONE" -le "$N" ]; then # every (N / N_ALONE)-th request of the batch
    awk -v st=$((N / N_ALONE)) -v m="$N_ALONE" 'NR == 1 {print; next}
        (NR - 2) % st == 0 && c < m {print; c++}' "$WORK/batch.csv" >"$WORK/alone.csv"
else
    head -n $((N_ALONE + 1)) "$WORK/all.csv" >"$WORK/alone.csv"
fi
MEANS=$(awk -F, 'NR > 1 {a += $2; b += $3; n++} END {printf "%.0f %.0f", a / n, b / n}' "$WORK/batch.csv")

HOSTCPU=$( (command -v lscpu >/dev/null && lscpu | awk -F: '/^Model name/ {gsub(/^ +/, "", $2); m = $2}
    /^Thread\(s\) per core/ {gsub(/ /, "", $2); t = $2} END {printf "%s, %s thread(s) per core", m, t}') || echo "unknown CPU")
log "$K instances (threads $THREADS) of $MODEL on $NCPU CPUs ($HOSTCPU); pinned: $PINNED;" \
    "OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-(auto)}"

# ---------------------------------------------------------------- 2. instances
UPS=()
INST_URLS=()
for k in $(seq 0 $((K - 1))); do
    t=${TH[$k]}
    pinned "${INST_CPUS[$k]}" "$LOOM" serve --model "$MODEL" --served-model-name m --backend cpu \
        --threads "$t" --max-num-seqs "$MAX_SEQS" --num-kv-blocks "$KV_BLOCKS" \
        --no-enable-prefix-caching --host 127.0.0.1 --port 0 >"$WORK/serve-$k.log" 2>&1 &
    PIDS+=($!)
    u=$(wait_line "$WORK/serve-$k.log" $!) || exit 1
    INST_URLS+=("$u")
    UPS+=(--upstream "$u")
done
log "instances: ${INST_URLS[*]}"

# ---------------------------------------------------------------- 3. profiles
UNIQ=$(printf '%s\n' "${TH[@]}" | sort -n -u | tr '\n' ' ')
if [ -n "${PROFILES:-}" ]; then
    PROF_DIR=$PROFILES
    for t in $UNIQ; do
        grep -qs "^tp: $t\$" "$PROF_DIR"/*.yaml || die "PROFILES=$PROF_DIR has no profile with tp $t"
    done
    log "profiles from $PROF_DIR"
else
    PROF_DIR=$WORK/profiles
    mkdir -p "$PROF_DIR"
    log "profiling ($PROFILE) thread counts: $UNIQ(grid ${GRID[*]})"
    ppids=()
    for t in $UNIQ; do
        cpus=""
        for k in $(seq 0 $((K - 1))); do
            [ "${TH[$k]}" = "$t" ] && { cpus=${INST_CPUS[$k]}; break; }
        done
        if [ "$PROFILE" = url ]; then # through the instance itself, from the client's CPUs
            pinned "$CLIENT_CPUS" "$LOOM" profile --url "${INST_URLS[$k]}" --model "$MODEL" \
                --device cpu --tp "$t" "${GRID[@]}" --max-num-batched-tokens 2048 \
                --out "$PROF_DIR/cpu-tp$t.yaml" --no-progress >"$WORK/profile-$t.log" 2>&1 &
        else
            pinned "$cpus" "$LOOM" profile --model "$MODEL" --backend cpu --threads "$t" "${GRID[@]}" \
                --max-num-batched-tokens 2048 --out "$PROF_DIR/cpu-tp$t.yaml" --no-progress \
                >"$WORK/profile-$t.log" 2>&1 &
        fi
        PIDS+=($!)
        ppids+=("$!:$t")
        # unpinned, profiles would compete for the same cores: one at a time
        [ "$PINNED" = 1 ] || { wait "$!" || die "profile $t threads: $(tail -3 "$WORK/profile-$t.log")"; }
    done
    for pt in "${ppids[@]}"; do
        wait "${pt%%:*}" || die "profile ${pt#*:} threads: $(tail -3 "$WORK/profile-${pt#*:}.log")"
    done
fi
T_PROFILED=$(elapsed)

# ---------------------------------------------------------------- 4. plan
# One `loom plan` over a machine of max(THREADS) cores: its table of "configurations that fit"
# has a row per degree (here: threads) with the batch and the predicted prefill, decode and
# output tokens/s, marked `profile` where a profile of that degree was used. The plan's own
# partition is not what is started (8/4/2/1 is given, not searched), so the instances' rows are
# taken from the table. (`--tp T` would restrict the search, but it refuses a T that does not
# divide the model's heads even on the pooled cpu device; llama-125m has 12.)
MAXT=$(printf '%s\n' "${TH[@]}" | sort -n | tail -n1)
printf 'machines:\n  - {name: cpu, device: cpu, count: %s, host: 127.0.0.1}\n' "$MAXT" >"$WORK/cluster.yaml"
"$LOOM" plan --cluster "$WORK/cluster.yaml" --model "$MODEL" --workload "$WORK/batch.csv" \
    --profiles "$PROF_DIR" --max-num-seqs "$MAX_SEQS" --no-output >"$WORK/plan.log" 2>&1 ||
    die "plan: $(tail -3 "$WORK/plan.log")"
# the same over the alone workload: the prediction for what step 5 measures
"$LOOM" plan --cluster "$WORK/cluster.yaml" --model "$MODEL" --workload "$WORK/alone.csv" \
    --profiles "$PROF_DIR" --max-num-seqs "$MAX_SEQS" --no-output >"$WORK/plan-alone.log" 2>&1 ||
    die "plan (alone workload): $(tail -3 "$WORK/plan-alone.log")"
# row T [LOG]: "batch prefill decode output source" from the table
row() {
    awk -v t="$1" '/^configurations that fit/ {on = 1; next} on && /^$/ {exit}
        on && $1 == "cpu" && $2 == t {gsub(/,/, ""); print $6, $7, $8, $9, $11; exit}' "${2:-$WORK/plan.log}"
}
for t in "${TH[@]}"; do
    row "$t" "$WORK/plan-alone.log"
done >"$WORK/alone-pred.txt"
read -r MEAN_IN MEAN_OUT <<<"$(awk '/mean input/ {for (i = 1; i <= NF; i++) {
    if ($i == "input") mi = $(i + 1); if ($i == "output") mo = $(i + 1)} gsub(/,/, "", mi); print mi, mo; exit}' "$WORK/plan.log")"
for k in $(seq 0 $((K - 1))); do
    t=${TH[$k]}
    read -r batch pre dec out src <<<"$(row "$t")"
    [ -n "$out" ] || die "no row for $t threads in the plan's table: $(cat "$WORK/plan.log")"
    [ "$src" = profile ] || log "WARNING: $t threads: the plan used $src coefficients, not a profile"
    devs=$(seq -s ', ' 0 $((t - 1)))
    awk -v name="cpu$k-t$t" -v t="$t" -v devs="$devs" -v kv="$KV_BLOCKS" -v b="$batch" -v p="$pre" \
        -v d="$dec" -v o="$out" -v mi="$MEAN_IN" -v mo="$MEAN_OUT" 'BEGIN {
        printf "  - machine: \"%s\"\n    host: \"127.0.0.1\"\n    device: \"cpu\"\n    tp: %d\n", name, t
        printf "    devices: [%s]\n    block_size: 16\n    kv_blocks: %d\n    max_batch: %d\n", devs, kv, b
        printf "    prefill_tokens_per_s: %.4f\n    decode_tokens_per_s: %.4f\n", p, d
        printf "    output_tokens_per_s: %.4f\n    total_tokens_per_s: %.4f\n", o, o * (mi + mo) / mo
        printf "    requests_per_s: %.4f\n", o / mo }'
done >"$WORK/instances.yaml"
{
    echo "# loom plan rows for cpu at each instance's thread count (bench/hetero_cpu.sh)"
    echo "model: \"${MODEL#random:}\""
    echo "objective: throughput"
    echo "workload: \"batch.csv\""
    echo "mean_input: $MEAN_IN"
    echo "mean_output: $MEAN_OUT"
    # the totals are the sums of the instances' figures as written (loom plan --check insists)
    awk '$1 == "output_tokens_per_s:" {o += $2} $1 == "total_tokens_per_s:" {t += $2}
         $1 == "requests_per_s:" {r += $2}
         END {printf "predicted:\n  output_tokens_per_s: %.4f\n  total_tokens_per_s: %.4f\n", o, t
              printf "  requests_per_s: %.4f\n  cost_per_hour: 0\ninstances:\n", r}' "$WORK/instances.yaml"
    cat "$WORK/instances.yaml"
} >"$WORK/plan.yaml"
"$LOOM" plan --check "$WORK/plan.yaml" >"$WORK/check.log" 2>&1 || die "merged plan: $(tail -3 "$WORK/check.log")"

# ---------------------------------------------------------------- 5. each instance alone
for k in $(seq 0 $((K - 1))); do
    log "alone: instance $k (${TH[$k]} threads), $N_ALONE requests at once [$(elapsed) s]"
    pinned "$CLIENT_CPUS" "$LOOM" bench --url "${INST_URLS[$k]}" --model m --trace "$WORK/alone.csv" \
        --batch "$N_ALONE" --warmup 2 --prompt-mode ids --no-progress --quiet \
        --out "$WORK/alone-$k.json" >/dev/null 2>>"$WORK/bench.log" ||
        die "bench alone $k: $(tail -3 "$WORK/bench.log")"
done
T_ALONE=$(elapsed)

# ---------------------------------------------------------------- 6. the policies
URLS=()
LABELS=()
for p in $POLICIES; do
    pinned "$CLIENT_CPUS" "$LOOM" gateway --policy "$p" --plan "$WORK/plan.yaml" "${UPS[@]}" \
        --host 127.0.0.1 --port 0 --health-interval 1 >"$WORK/gw-$p.log" 2>&1 &
    PIDS+=($!)
    g=$(wait_line "$WORK/gw-$p.log" $!) || exit 1
    URLS+=(--url "$g")
    LABELS+=(--label "$p")
done
read -r -a POL <<<"$POLICIES"
log "policies: ${POL[*]} x $ROUNDS rounds, $N requests at once each [$(elapsed) s]"
pinned "$CLIENT_CPUS" "$LOOM" bench "${URLS[@]}" "${LABELS[@]}" --model m --trace "$WORK/batch.csv" \
    --batch "$N" --rounds "$ROUNDS" --interleave runs --warmup 2 --prompt-mode ids --no-progress \
    --quiet --out "$WORK/policies.json" >/dev/null 2>>"$WORK/bench.log" ||
    die "bench through the gateways: $(tail -3 "$WORK/bench.log")"
T_DONE=$(elapsed)

# ---------------------------------------------------------------- report
export PROFILE PROF_DIR WORK K THREADS POLICIES ROUNDS N N_ALONE MODEL MAX_SEQS PINNED NCPU HOSTCPU MEANS \
    T_PROFILED T_ALONE T_DONE IN_DIV OUT_DIV MAX_IN MAX_OUT KV_BLOCKS
export INST_CPUS_LIST="$(IFS=';'; echo "${INST_CPUS[*]}")" CLIENT_CPUS INST_URLS_LIST="${INST_URLS[*]}"
python3 - <<'EOF'
import json, os, statistics as st

env = os.environ
work, k = env["WORK"], int(env["K"])
threads = env["THREADS"].split()
policies = env["POLICIES"].split()
urls = env["INST_URLS_LIST"].split()
cpus = env["INST_CPUS_LIST"].split(";")


def ok(r):
    return r.get("error") in (None, "", "ok")


def rate(reqs):
    """output tokens over the makespan of a set of requests (one run)"""
    reqs = [r for r in reqs if ok(r)]
    if not reqs:
        return 0.0
    span = max(r["end_s"] for r in reqs) - min(r["start_s"] for r in reqs)
    return sum(r["output_tokens"] for r in reqs) / span if span > 0 else 0.0


def full_batch_rate(reqs, b):
    """output tokens/s while b requests run: from the first start until the queue is empty and
    the (n - b + 1)-th request finishes (fewer than b run after it); each token at its time
    (start + ttft, then the inter-token gaps; several tokens in one chunk share its time)"""
    reqs = [r for r in reqs if ok(r)]
    n = len(reqs)
    if n <= b:
        return rate(reqs)
    t0 = min(r["start_s"] for r in reqs)
    t1 = sorted(r["end_s"] for r in reqs)[n - b]
    tokens = 0.0
    for r in reqs:
        times, t = [], r["start_s"] + (r.get("ttft_s") or 0)
        times.append(t)
        for gap in r.get("itl_s") or []:
            t += gap
            times.append(t)
        per_chunk = r["output_tokens"] / len(times)
        tokens += per_chunk * sum(1 for x in times if x <= t1)
    return tokens / (t1 - t0) if t1 > t0 else 0.0


def profile_error(tp):
    """rel_rms_error of the profile for cpu at this tp (the fit's relative RMS error)"""
    d = env["PROF_DIR"]
    for name in sorted(os.listdir(d)):
        text = open(os.path.join(d, name)).read() if name.endswith(".yaml") else ""
        if f"\ntp: {tp}\n" in text and "rel_rms_error:" in text:
            return float(text.split("rel_rms_error:")[1].split("}")[0].split(",")[0])
    return None


def plan_instances(path):
    out, cur = [], None
    for line in open(path):
        if line.startswith("  - machine:"):
            cur = {}
            out.append(cur)
        elif cur is not None and line.startswith("    ") and ":" in line:
            key, val = line.strip().split(":", 1)
            try:
                cur[key] = float(val)
            except ValueError:
                cur[key] = val.strip().strip('"')
    return out


plan = plan_instances(f"{work}/plan.yaml")
pol = json.load(open(f"{work}/policies.json"))
reqs = pol["requests"]
failed = sum(1 for r in reqs if not ok(r))
rounds = sorted({r["round"] for r in reqs})
per = {}  # policy -> [rate per round]
share = {}  # policy -> requests per instance url
for t, name in enumerate(policies):
    per[name] = [rate([r for r in reqs if r["target"] == t and r["round"] == rd]) for rd in rounds]
    cnt = {u: 0 for u in urls}
    for r in reqs:
        if r["target"] == t and ok(r) and r.get("instance") in cnt:
            cnt[r["instance"]] += 1
    share[name] = cnt
base = st.median(per["round_robin"]) if "round_robin" in per else None

alone, alone_span = [], []  # full-batch rate, makespan rate
for i in range(k):
    a = json.load(open(f"{work}/alone-{i}.json"))
    alone.append(full_batch_rate(a["requests"], int(env["MAX_SEQS"])))
    alone_span.append(rate(a["requests"]))
# the planner's rows over the alone workload: batch prefill decode output source
pred = [line.split() for line in open(f"{work}/alone-pred.txt")]

print(f"### {k} CPU instances of {env['MODEL']}: threads {' / '.join(threads)}")
print()
print(f"Host: {env['NCPU']} CPUs ({env['HOSTCPU']}; OpenBLAS kernels "
      f"{env.get('OPENBLAS_CORETYPE') or 'chosen by loom: src/tensor/blas_cpu.c'}); "
      + ("each instance pinned to its own CPUs (taskset), the gateways and the client on "
         f"CPU{'s' if ',' in env['CLIENT_CPUS'] else ''} {env['CLIENT_CPUS']}." if env["PINNED"] == "1" else
         "NOT pinned (too few CPUs or no taskset): instances share the cores."))
means = env["MEANS"].split()
print(f"Workload: the first {env['N']} requests of azure2023_conv.csv, prompts / {env['IN_DIV']} "
      f"(at most {env['MAX_IN']}), outputs / {env['OUT_DIV']} (at most {env['MAX_OUT']}): mean "
      f"{means[0]} in, {means[1]} out; all submitted at once, {len(rounds)} round(s) per policy, "
      f"interleaved. Instances: --max-num-seqs {env['MAX_SEQS']}, {env['KV_BLOCKS']} KV blocks, "
      "prefix caching off. Profiles: "
      + ("given (PROFILES)." if env.get("PROFILES") else
         "through the live instances (`loom profile --url`)." if env["PROFILE"] == "url" else
         "in process (`loom profile --backend cpu`), engine steps only."))
print()
print("| policy | output tok/s, median | min–max | vs round_robin | requests per instance "
      f"({' / '.join(t + 't' for t in threads)}) |")
print("|---|---|---|---|---|")
for name in policies:
    v = per[name]
    ratio = f"{st.median(v) / base:.2f}x" if base else "—"
    sh = " / ".join(str(share[name][u]) for u in urls)
    print(f"| {name} | {st.median(v):.1f} | {min(v):.1f}–{max(v):.1f} | {ratio} | {sh} |")
print()
print("Per round (output tok/s): "
      + "; ".join(f"{name} " + ", ".join(f"{x:.1f}" for x in per[name]) for name in policies)
      + f". Failed requests: {failed}.")
print()
tot_pred = sum(float(p[3]) for p in pred)
tot_meas = sum(alone)
print("| instance | threads | CPUs | profile fit error | predicted prefill tok/s | "
      "predicted decode tok/s | predicted output tok/s | measured alone, full batch | "
      "measured / predicted | alone over the makespan | gateways' plan, output tok/s | "
      "capacity_aware's share of requests |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
ca = share.get("capacity_aware")
ca_n = sum(ca.values()) if ca else 0
for i in range(k):
    p = plan[i] if i < len(plan) else {}
    pre, dec, po = (float(x) for x in pred[i][1:4])
    rs = f"{100 * ca[urls[i]] / ca_n:.0f}%" if ca and ca_n else "—"
    fe = profile_error(threads[i])
    fe = f"{100 * fe:.1f}%" if fe is not None else "—"
    print(f"| {i} | {threads[i]} | {cpus[i] or 'any'} | {fe} | {pre:.0f} | {dec:.0f} | {po:.1f} | "
          f"{alone[i]:.1f} | {alone[i] / po if po else 0:.2f} | {alone_span[i]:.1f} | "
          f"{p.get('output_tokens_per_s', 0):.1f} | {rs} |")
print(f"| **sum** | | | | | | **{tot_pred:.1f}** | **{tot_meas:.1f}** | "
      f"{tot_meas / tot_pred if tot_pred else 0:.2f} | {sum(alone_span):.1f} | "
      f"{sum(p.get('output_tokens_per_s', 0) for p in plan):.1f} | |")
print()
slow = min(alone) if alone else 0
if slow > 0:
    n, na = int(env["N"]), int(env["N_ALONE"])
    which = f"one in {n // na} of the batch" if na <= n else "the first of the trace"
    print(f"Measured alone: {na} requests at once per instance ({which}), one instance at a time; "
          f"'full batch' counts the output tokens while {env['MAX_SEQS']} requests run (until "
          "the queue is empty and the next request finishes), which is what the planner's "
          "steady-state estimate describes; the predicted columns are `loom plan` over that "
          "same workload. Ideal gain of a perfect split of an offline batch over an even one, "
          f"from the full-batch rates: sum / ({k} x slowest) = {tot_meas / (k * slow):.2f}x.")
print()
print(f"Wall time: profiles {env['T_PROFILED']} s, alone runs done at {env['T_ALONE']} s, "
      f"all done at {env['T_DONE']} s.")
EOF
