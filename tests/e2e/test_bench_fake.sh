#!/usr/bin/env bash
# loom bench against bench/fake_upstream (no model: every behaviour is the client's): text
# prompts calibrated through POST /tokenize, per-instance shares from a gateway header, two
# targets compared with ratios, offline batch, a Mooncake trace replay with plots, an upstream
# that exits mid-run, and Ctrl-C (SIGINT) still producing the report.
# Needs $(dirname $LOOM_BIN)/bench/fake_upstream ('make benches'), or FAKE_UPSTREAM=path.
set -u
source "$(dirname "$0")/lib.sh"

FAKE=${FAKE_UPSTREAM:-$(dirname "$LOOM_BIN")/bench/fake_upstream}
[ -x "$FAKE" ] || skip "no $FAKE (build it with 'make benches')"
command -v python3 >/dev/null || skip "python3 is absent"

# start_fake NAME args...: sets NAME_URL and NAME_PID
start_fake() {
    local name=$1
    shift
    "$FAKE" --port 0 "$@" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    E2E_PIDS+=("$pid")
    local url=""
    for _ in $(seq 100); do
        url=$(grep -o 'http://[0-9.]*:[0-9]*' "$WORK/$name.log" 2>/dev/null | head -n1)
        [ -n "$url" ] && break
        sleep 0.05
    done
    [ -n "$url" ] || die "$name: fake_upstream did not start"
    printf -v "${name}_URL" '%s' "$url"
    printf -v "${name}_PID" '%s' "$pid"
}

bench() { timeout 50 "$LOOM_BIN" bench "$@"; }
check() { # check FILE EXPR: EXPR over the result JSON as r must hold
    python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
ok = bool(eval(sys.argv[2]))
print(sys.argv[1], ":", sys.argv[2], "->", ok)
sys.exit(0 if ok else 1)' "$1" "$2"
}

start_fake A --instances gpu-0,gpu-1
start_fake B --itl-us 300 --no-tokenize

# text prompts through /tokenize (A), token ids where there is none (B); shares; ratios
bench --url "$A_URL" --url "$B_URL" --label fast --label paced --input-len uniform:5-300 \
    --output-len 8 --concurrency 16 --max-requests 200 --rounds 2 --slo ttft=1s \
    --out "$WORK/two.json" --markdown "$WORK/two.md" >"$WORK/two.out" 2>&1 ||
    { cat "$WORK/two.out" >&2; die "two-target run failed"; }
check "$WORK/two.json" "r['prompt_kind'] == 'text (/tokenize)'" || die "no /tokenize calibration"
check "$WORK/two.json" "all(q['prompt_tokens'] == q['input_len'] for q in r['requests'])" ||
    die "prompt lengths are not exact"
check "$WORK/two.json" "r['completed'] == 400 and r['instances'] == {'gpu-0': 200, 'gpu-1': 200}" ||
    die "per-instance shares"
check "$WORK/two.json" "len(r['targets']) == 2 and r['targets'][1]['completed'] == 400 and 'ratio_to_first' in r['targets'][1]" ||
    die "second target"
check "$WORK/two.json" "r['request_goodput'] is not None and len(r['ttfts']) == 400" || die "goodput"
grep -q "ratio" "$WORK/two.out" || die "no ratio column"
grep -q "| paced / fast |" "$WORK/two.md" || die "markdown table"
grep -q "gpu-1" "$WORK/two.out" || die "no instance shares in the summary"

# a server that adds a BOS and splits long words: calibrated word by word, still exact
start_fake D --bos 1 --split-over 5
bench --url "$D_URL" --input-len uniform:1-200 --output-len 2 --concurrency 8 --max-requests 100 \
    --out "$WORK/bos.json" >"$WORK/bos.out" 2>&1 || { cat "$WORK/bos.out" >&2; die "BOS run failed"; }
check "$WORK/bos.json" "r['prompt_kind'] == 'text (/tokenize)'" || die "no word-by-word calibration"
check "$WORK/bos.json" "all(q['prompt_tokens'] == max(q['input_len'], 2) for q in r['requests'])" ||
    die "prompt lengths with a BOS are not exact"

# every request to both targets at once
bench --url "$A_URL" --url "$B_URL" --interleave requests --input-len 20 --output-len 4 \
    --rate 200 --max-requests 100 --out "$WORK/inter.json" >"$WORK/inter.out" 2>&1 ||
    die "interleaved run failed"
check "$WORK/inter.json" "r['completed'] == 100 and r['targets'][1]['completed'] == 100" ||
    die "interleaved counts"

# offline batch: everything at once, throughput over the makespan
bench --url "$A_URL" --batch 500 --input-len 16 --output-len 32 --out "$WORK/batch.json" \
    >"$WORK/batch.out" 2>&1 || die "batch run failed"
check "$WORK/batch.json" "r['completed'] == 500 and r['max_concurrent_requests'] == 500" ||
    die "batch: all at once"
check "$WORK/batch.json" "abs(r['output_throughput'] - 500 * 32 / r['duration']) < 1e-6 * r['output_throughput']" ||
    die "batch throughput"

# a Mooncake trace, time-scaled, with plots
if [ -n "${LOOM_SHARED:-}" ] && [ -f "$LOOM_SHARED/data/traces/mooncake_conversation.jsonl" ]; then
    bench --url "$A_URL" --trace "$LOOM_SHARED/data/traces/mooncake_conversation.jsonl" \
        --time-scale 0.01 --max-requests 300 --out "$WORK/mc.json" --plot "$WORK/mcplots" \
        >"$WORK/mc.out" 2>&1 || { cat "$WORK/mc.out" >&2; die "Mooncake replay failed"; }
    check "$WORK/mc.json" "r['completed'] == 300 and r['time_scale'] == 0.01" || die "Mooncake run"
    for f in ttft_0.dat throughput_0.dat instances.dat plots.gp; do
        [ -s "$WORK/mcplots/$f" ] || die "no $f"
    done
    if command -v gnuplot >/dev/null; then
        for f in ttft_cdf tpot_cdf itl_cdf e2el_cdf throughput instances; do
            [ -s "$WORK/mcplots/$f.png" ] || die "no $f.png"
        done
    fi
fi

# an upstream that exits mid-run: failures counted, report written, status 1
start_fake C --exit-after 150
bench --url "$C_URL" --model fake --input-len 8 --output-len 4 --concurrency 4 \
    --max-requests 400 --timeout 5 --out "$WORK/dead.json" >"$WORK/dead.out" 2>&1
rc=$?
[ $rc -eq 1 ] || { cat "$WORK/dead.out" >&2; die "exit status $rc after the upstream died, want 1"; }
check "$WORK/dead.json" "r['completed'] >= 140 and r['failed'] > 0 and r['completed'] + r['failed'] == 400" ||
    die "failures not counted"
grep -q "first connect error" "$WORK/dead.out" || die "the report does not say why requests failed"

# SIGINT: the run stops, in-flight requests are cancelled, the report is still written
"$LOOM_BIN" bench --url "$B_URL" --input-len 8 --output-len 2000 --concurrency 8 \
    --max-requests 100 --out "$WORK/int.json" >"$WORK/int.out" 2>&1 &
pid=$!
E2E_PIDS+=("$pid")
sleep 1
kill -INT "$pid"
rc=""
for _ in $(seq 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid"
        rc=$?
        break
    fi
    sleep 0.1
done
[ -n "$rc" ] || die "loom bench still running 10 s after SIGINT"
[ "$rc" -eq 1 ] || die "exit status $rc after SIGINT, want 1"
check "$WORK/int.json" "r['interrupted'] and r['errors_by_kind'].get('cancelled', 0) > 0" ||
    die "interrupted run not reported"
grep -q "INTERRUPTED" "$WORK/int.out" || die "the summary does not say the run was interrupted"

# bad input: a clear message with the line number, status 2
printf 'TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,12\n' >"$WORK/bad.csv"
bench --url "$A_URL" --trace "$WORK/bad.csv" >"$WORK/bad.out" 2>&1
rc=$?
[ $rc -eq 2 ] || die "a malformed trace gave status $rc, want 2"
grep -q "line 2:" "$WORK/bad.out" || die "no line number in: $(cat "$WORK/bad.out")"
echo "PASS: loom bench against fake_upstream"
