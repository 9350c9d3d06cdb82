#!/usr/bin/env bash
# loom bench against loom serve (random:llama-tiny) on a free loopback port:
#   1. the bench's token counts equal the server's vllm:prompt_tokens_total and
#      vllm:generation_tokens_total deltas exactly;
#   2. its TTFT and E2E latencies agree with the server's histograms within their resolution:
#      the client's interval contains the server's, so each request lies in the server's bucket
#      or in the next one;
#   3. a server killed mid-run: the failures are counted by kind, the report and the JSON are
#      still written, and the exit status is 1, in bounded time.
set -u
source "$(dirname "$0")/lib.sh"

command -v python3 >/dev/null || skip "python3 is absent"
command -v curl >/dev/null || skip "curl is absent"

start_server S --model random:llama-tiny --threads 1
curl -sf "$S_URL/metrics" >"$WORK/before.prom" || die "GET /metrics failed"
timeout 60 "$LOOM_BIN" bench --url "$S_URL" --input-len uniform:8-96 --output-len uniform:2-24 \
    --max-requests 40 --concurrency 6 --seed 3 --out "$WORK/r.json" \
    >"$WORK/bench.out" 2>&1
rc=$?
[ $rc -eq 0 ] || { cat "$WORK/bench.out" >&2; die "loom bench exited $rc against a healthy server"; }
curl -sf "$S_URL/metrics" >"$WORK/after.prom" || die "GET /metrics failed"
grep -q "Successful requests" "$WORK/bench.out" || die "no summary table"

python3 - "$WORK" <<'EOF' || die "bench and server metrics disagree"
import json, math, re, sys
work = sys.argv[1]

def parse(path):
    counters, buckets, sums, counts = {}, {}, {}, {}
    for line in open(path):
        if line.startswith('#') or not line.strip():
            continue
        name_labels, value = line.rsplit(' ', 1)
        m = re.match(r'([^{]+)(\{(.*)\})?', name_labels)
        name, labels = m.group(1), m.group(3) or ''
        v = float(value)
        if name.endswith('_bucket'):
            le = re.search(r'le="([^"]+)"', labels).group(1)
            buckets.setdefault(name[:-7], {})[math.inf if le == '+Inf' else float(le)] = v
        elif name.endswith('_sum'):
            sums[name[:-4]] = v
        elif name.endswith('_count'):
            counts[name[:-6]] = v
        else:
            counters[name] = counters.get(name, 0) + v
    return counters, buckets, sums, counts

c0, b0, s0, n0 = parse(f'{work}/before.prom')
c1, b1, s1, n1 = parse(f'{work}/after.prom')
r = json.load(open(f'{work}/r.json'))
ok = [q for q in r['requests'] if q['error'] == 'ok']
assert r['completed'] == 40 == len(ok), (r['completed'], len(ok))
fail = False

# 1. token counts, exactly
for metric, key in (('vllm:prompt_tokens_total', 'total_input_tokens'),
                    ('vllm:generation_tokens_total', 'total_output_tokens')):
    delta = c1.get(metric, 0) - c0.get(metric, 0)
    print(f'{metric}: server delta {delta:.0f}, bench {r[key]}')
    if delta != r[key]:
        fail = True
# the requested lengths were honoured too (exact prompts, forced outputs)
for q in ok:
    if q['prompt_tokens'] != q['input_len'] or q['output_tokens'] != q['output_len']:
        print('request', q['index'], 'asked', q['input_len'], q['output_len'], 'got',
              q['prompt_tokens'], q['output_tokens'])
        fail = True

# 2. latencies against the server's histograms
for hist, field in (('vllm:time_to_first_token_seconds', 'ttft_s'),
                    ('vllm:e2e_request_latency_seconds', 'e2el_s')):
    bounds = sorted(b1[hist])
    server = [b1[hist][b] - b0.get(hist, {}).get(b, 0) for b in bounds]  # cumulative
    mine = sorted(q[field] for q in ok)
    bench = [sum(1 for v in mine if v <= b) for b in bounds]
    n = n1[hist] - n0.get(hist, 0)
    mean_server = (s1[hist] - s0.get(hist, 0)) / n
    mean_bench = sum(mine) / len(mine)
    print(f'{hist}: n {n:.0f} vs {len(mine)}, mean server {mean_server*1e3:.2f} ms, '
          f'bench {mean_bench*1e3:.2f} ms')
    if n != len(mine):
        fail = True
    for i, b in enumerate(bounds):
        nxt = bench[i + 1] if i + 1 < len(bounds) else bench[i]
        # the client measures from before the server's arrival to after its last byte:
        # never fewer requests under a bound at the server, never more than one bucket apart
        if not (bench[i] <= server[i] <= nxt):
            print(f'  le={b}: bench {bench[i]}, server {server[i]}, bench at next bound {nxt}')
            fail = True
    if not (mean_bench >= mean_server - 1e-4):
        print('  the bench mean is below the server mean')
        fail = True
sys.exit(1 if fail else 0)
EOF

# 1b. text prompts for a real tokenizer (the fixture tiny-llama), completions and chat: every
#     prompt is exactly as long as asked, and the counts still match the server's
if [ -n "${LOOM_SHARED:-}" ] && [ -f "$LOOM_SHARED/fixtures/tiny-llama/tokenizer.json" ]; then
    start_server T --model "$LOOM_SHARED/fixtures/tiny-llama" --threads 1
    curl -sf "$T_URL/metrics" >"$WORK/t0.prom" || die "GET /metrics failed"
    for api in completions chat; do
        ep=/v1/completions
        [ "$api" = chat ] && ep=/v1/chat/completions
        timeout 60 "$LOOM_BIN" bench --url "$T_URL" --endpoint "$ep" \
            --tokenizer "$LOOM_SHARED/fixtures/tiny-llama" --input-len uniform:20-300 \
            --output-len uniform:1-8 --max-requests 12 --concurrency 4 \
            --out "$WORK/t_$api.json" >"$WORK/t_$api.out" 2>&1 ||
            { cat "$WORK/t_$api.out" >&2; die "text prompts against $ep failed"; }
    done
    curl -sf "$T_URL/metrics" >"$WORK/t1.prom" || die "GET /metrics failed"
    python3 - "$WORK" <<'EOF' || die "text prompts are not exact"
import json, sys
work = sys.argv[1]
def counter(path, name):
    return sum(float(l.rsplit(' ', 1)[1]) for l in open(path) if l.startswith(name + '{'))
total_in = total_out = 0
for api in ('completions', 'chat'):
    r = json.load(open(f'{work}/t_{api}.json'))
    assert r['prompt_kind'] == 'text (tokenizer)', r['prompt_kind']
    assert r['completed'] == 12, r['completed']
    for q in r['requests']:
        assert q['prompt_tokens'] == q['input_len'], (api, q['input_len'], q['prompt_tokens'])
    total_in += r['total_input_tokens']
    total_out += r['total_output_tokens']
d_in = counter(f'{work}/t1.prom', 'vllm:prompt_tokens_total') - \
    counter(f'{work}/t0.prom', 'vllm:prompt_tokens_total')
d_out = counter(f'{work}/t1.prom', 'vllm:generation_tokens_total') - \
    counter(f'{work}/t0.prom', 'vllm:generation_tokens_total')
print(f'text prompts: server deltas {d_in:.0f}/{d_out:.0f}, bench {total_in}/{total_out}')
assert d_in == total_in and d_out == total_out
EOF
fi

# 3. the server goes away in the middle of a run
start_server K --model random:llama-tiny --threads 1
"$LOOM_BIN" bench --url "$K_URL" --input-len 32 --output-len 48 --rate 30 --max-requests 300 \
    --timeout 10 --out "$WORK/k.json" --plot "$WORK/plots" >"$WORK/k.out" 2>&1 &
bench_pid=$!
E2E_PIDS+=("$bench_pid")
sleep 2
kill -KILL "$K_PID"
rc=""
for _ in $(seq 300); do # at most 30 s: the schedule is 10 s, each request at most 10 s
    if ! kill -0 "$bench_pid" 2>/dev/null; then
        wait "$bench_pid"
        rc=$?
        break
    fi
    sleep 0.1
done
[ -n "$rc" ] || die "loom bench still running 30 s after its server was killed"
[ "$rc" -eq 1 ] || { cat "$WORK/k.out" >&2; die "exit status $rc after failures, want 1"; }
grep -q "Failed requests" "$WORK/k.out" || { cat "$WORK/k.out" >&2; die "no report after the server died"; }
grep -q "connect" "$WORK/k.out" || { cat "$WORK/k.out" >&2; die "no connect errors reported"; }
[ -s "$WORK/plots/ttft_0.dat" ] || die "no plot data written"
python3 - "$WORK/k.json" <<'EOF' || die "the JSON of the interrupted run is wrong"
import json, sys
r = json.load(open(sys.argv[1]))
print('completed', r['completed'], 'failed', r['failed'], r['errors_by_kind'])
assert r['completed'] > 0 and r['failed'] > 0
assert r['completed'] + r['failed'] == r['num_prompts'] == 300
assert r['errors_by_kind'].get('connect', 0) > 0
assert len(r['requests']) == 300
EOF
echo "PASS: bench token counts and latencies agree with loom serve; a dead server is reported"
