// Client for tests/e2e/test_gateway_*.sh: drives a running `loom gateway` (with `loom serve`
// instances behind it) over loopback with Node's built-in fetch and checks every answer.
//
//   node gateway_client.mjs basic GATEWAY_URL UPSTREAM_URL,UPSTREAM_URL,...
//   node gateway_client.mjs burst GATEWAY_URL N [OUT.json]
//   node gateway_client.mjs served GATEWAY_URL UPSTREAM_URL N
//   node gateway_client.mjs limits GATEWAY_URL KEY
//
// "basic": concurrent mixed requests each answered exactly once (counted at the instances),
// x-loom-instance on every answer, streams passed through as they are produced, /v1/models,
// /metrics, errors (400, 404, 405, 413), drain and undrain, and a client that disconnects
// mid-stream freeing its instance.
// "burst": N mixed requests at once; every one must end: non-streaming ones in 200 (retried
// elsewhere if their instance dies), streams in [DONE] (after an error event if theirs died
// mid-way). Prints a summary line (and writes it as JSON).
// "served": N requests, 8 at a time; the named upstream must serve at least one (re-admission).
// "limits": a gateway with --api-key KEY, --queue-size 2 and a short --queue-timeout in front of
// one instance whose KV cache holds one request at a time: 401s, then 5 requests at once: one
// served, two refused at once (queue_full), two after waiting (queue_timeout), all 503s with
// Retry-After; then the queue drains and requests are served again.
// Exits 0 when every check passes, 1 with the first failure otherwise.

import { writeFileSync } from 'node:fs';

const [phase, base, arg3, arg4] = process.argv.slice(2);
const t0 = Date.now();

function fail(msg) {
    throw new Error(msg);
}
function check(cond, msg) {
    if (!cond) fail(msg);
}
function log(msg) {
    console.log(`[${((Date.now() - t0) / 1000).toFixed(2)}s] ${msg}`);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function http(method, url, body, { headers = {}, signal, raw = false } = {}) {
    const init = { method, headers: { ...headers }, signal };
    if (body !== undefined) {
        init.body = raw ? body : JSON.stringify(body);
        init.headers['Content-Type'] = 'application/json';
    }
    const res = await fetch(url, init);
    const text = await res.text();
    return { status: res.status, headers: res.headers, text };
}

function parseJson(text, what) {
    try {
        return JSON.parse(text);
    } catch (e) {
        fail(`${what}: not JSON: ${text.slice(0, 200)}`);
    }
}

function checkOpenAIError(r, status, what) {
    check(r.status === status, `${what}: status ${r.status}, want ${status}: ${r.text.slice(0, 200)}`);
    const j = parseJson(r.text, what);
    check(j.error && typeof j.error.message === 'string' && typeof j.error.type === 'string',
          `${what}: not an OpenAI error body: ${r.text.slice(0, 200)}`);
    return j.error;
}

// Prometheus text: samples as {name, labels, value}; every sample must follow a # TYPE of its
// family and histograms must be cumulative per label set.
function parseMetrics(text) {
    check(text.endsWith('\n'), 'metrics: the page must end with a newline');
    const types = new Map();
    const samples = [];
    for (const line of text.slice(0, -1).split('\n')) {
        if (line.startsWith('# TYPE ')) {
            const [, , name, type] = line.split(' ');
            check(!types.has(name), `metrics: second TYPE for ${name}`);
            types.set(name, type);
            continue;
        }
        if (line.startsWith('#')) continue;
        const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$/.exec(line);
        check(m, `metrics: bad sample line: ${line}`);
        const labels = {};
        let rest = m[3] || '';
        while (rest.length) {
            const lm = /^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\[\\"n])*)"(,|$)/.exec(rest);
            check(lm, `metrics: bad labels in ${line}`);
            labels[lm[1]] = lm[2];
            rest = rest.slice(lm[0].length);
        }
        const family = types.has(m[1]) ? m[1] : m[1].replace(/_(bucket|sum|count)$/, '');
        check(types.has(family), `metrics: sample without a # TYPE: ${line}`);
        const value = m[4] === '+Inf' ? Infinity : Number(m[4]);
        check(!Number.isNaN(value), `metrics: bad value in ${line}`);
        samples.push({ name: m[1], family, labels, value });
    }
    for (const [fname, type] of types) {
        if (type !== 'histogram') continue;
        const sets = new Map();
        for (const s of samples.filter((x) => x.name === fname + '_bucket')) {
            const key = JSON.stringify({ ...s.labels, le: undefined });
            const prev = sets.get(key) ?? -1;
            check(s.value >= prev, `metrics: ${fname} buckets not cumulative`);
            sets.set(key, s.value);
        }
    }
    return samples;
}

function sum(samples, name, filter = () => true) {
    return samples.filter((s) => s.name === name && filter(s.labels)).reduce((a, s) => a + s.value, 0);
}

// One request through the gateway. Streams are read frame by frame, with the time of each.
async function generate({ chat, stream, maxTokens, prompt = 'The quick brown fox', signal,
                          onFirstFrame } = {}) {
    const path = chat ? '/v1/chat/completions' : '/v1/completions';
    const body = chat
        ? { messages: [{ role: 'user', content: prompt }], max_tokens: maxTokens, ignore_eos: true }
        : { prompt, max_tokens: maxTokens, ignore_eos: true };
    if (stream) {
        body.stream = true;
        body.stream_options = { include_usage: true };
    }
    const start = Date.now();
    const res = await fetch(base + path, {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body), signal,
    });
    const out = { status: res.status, instance: res.headers.get('x-loom-instance'), frames: [],
                  times: [], done: false, errorEvent: null, usage: null, body: null, start };
    if (!stream || res.status !== 200) {
        out.body = await res.text();
        if (res.status === 200) out.usage = parseJson(out.body, 'completion').usage;
        return out;
    }
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
            const frame = buf.slice(0, i);
            buf = buf.slice(i + 2);
            check(frame.startsWith('data: '), `stream: bad frame ${frame.slice(0, 80)}`);
            const data = frame.slice(6);
            if (data === '[DONE]') {
                out.done = true;
                continue;
            }
            const j = parseJson(data, 'stream frame');
            if (j.error) out.errorEvent = j.error;
            if (j.usage) out.usage = j.usage;
            out.frames.push(j);
            out.times.push(Date.now() - start);
            if (out.frames.length === 1 && onFirstFrame) onFirstFrame();
        }
    }
    check(buf.trim() === '', `stream: trailing bytes ${buf.slice(0, 80)}`);
    return out;
}

async function upstreamServed(url) {
    const r = await http('GET', url + '/metrics');
    check(r.status === 200, `upstream ${url} /metrics: ${r.status}`);
    const s = parseMetrics(r.text);
    return sum(s, 'vllm:request_success_total');
}

async function upstreamRunning(url) {
    const r = await http('GET', url + '/metrics');
    return sum(parseMetrics(r.text), 'vllm:num_requests_running') +
           sum(parseMetrics(r.text), 'vllm:num_requests_waiting');
}

// ------------------------------------------------------------------ phases

async function basic(upstreams) {
    const h = await http('GET', base + '/health');
    check(h.status === 200, `health: ${h.status} ${h.text}`);
    const models = parseJson((await http('GET', base + '/v1/models')).text, 'models');
    check(models.object === 'list' && models.data.some((m) => m.id === 'random:llama-tiny'),
          `models: ${JSON.stringify(models).slice(0, 200)}`);
    log(`models: ${models.data.map((m) => m.id).join(', ')}`);

    // exactly once: the instances' own success counters grow by exactly the number sent
    const before = await Promise.all(upstreams.map(upstreamServed));
    const N = 48;
    const reqs = [];
    for (let i = 0; i < N; i++)
        reqs.push({ chat: i % 2 === 1, stream: (i >> 1) % 2 === 1, maxTokens: 4 + (i % 9) });
    const results = await Promise.all(reqs.map((r) => generate(r)));
    const perInstance = new Map();
    results.forEach((res, i) => {
        const want = reqs[i];
        check(res.status === 200, `request ${i}: status ${res.status}: ${res.body}`);
        check(upstreams.includes(res.instance), `request ${i}: x-loom-instance ${res.instance}`);
        perInstance.set(res.instance, (perInstance.get(res.instance) || 0) + 1);
        check(res.usage && res.usage.completion_tokens === want.maxTokens,
              `request ${i}: usage ${JSON.stringify(res.usage)}, want ${want.maxTokens} tokens`);
        if (want.stream) check(res.done && !res.errorEvent, `request ${i}: stream did not end well`);
    });
    const after = await Promise.all(upstreams.map(upstreamServed));
    const delta = after.reduce((a, v, i) => a + v - before[i], 0);
    check(delta === N, `instances served ${delta} requests for ${N} sent (exactly once)`);
    for (const u of upstreams) check(perInstance.get(u) > 0, `instance ${u} served nothing`);
    log(`${N} requests answered once each: ${[...perInstance].map(([u, n]) => `${u} ${n}`).join(', ')}`);

    // streaming passes through as produced: the first frame well before the last
    const slow = await generate({ chat: false, stream: true, maxTokens: 200 });
    check(slow.status === 200 && slow.done, 'long stream');
    const first = slow.times[0], last = slow.times[slow.times.length - 1];
    check(slow.frames.length >= 100, `long stream: ${slow.frames.length} frames`);
    check(first < 0.5 * last, `stream buffered? first frame at ${first} ms, last at ${last} ms`);
    log(`stream of 200 tokens: first frame ${first} ms, last ${last} ms, ${slow.frames.length} frames`);

    // gateway metrics
    const m = parseMetrics((await http('GET', base + '/metrics')).text);
    for (const fam of ['loom:gateway_requests_total', 'loom:gateway_errors_total',
                       'loom:gateway_in_flight', 'loom:gateway_dispatch_share',
                       'loom:gateway_queue_depth', 'loom:gateway_time_to_first_token_seconds',
                       'loom:gateway_e2e_request_latency_seconds'])
        check(m.some((s) => s.family === fam), `metrics: no ${fam}`);
    for (const u of upstreams)
        check(m.some((s) => s.name === 'loom:gateway_requests_total' && s.labels.upstream === u),
              `metrics: no series for ${u}`);
    const share = sum(m, 'loom:gateway_dispatch_share');
    check(Math.abs(share - 1) < 1e-6, `metrics: dispatch shares sum to ${share}`);
    check(sum(m, 'loom:gateway_in_flight') === 0, 'metrics: requests still in flight');
    check(sum(m, 'loom:gateway_requests_total') === N + 1, 'metrics: request count');
    check(sum(m, 'loom:gateway_generation_tokens_total') > 0, 'metrics: token count');
    log('gateway /metrics parsed');

    // errors
    checkOpenAIError(await http('POST', base + '/v1/completions', '{"prompt": "x", ', { raw: true }),
                     400, 'garbage body');
    checkOpenAIError(await http('POST', base + '/v1/completions', '[1, 2, 3]', { raw: true }),
                     400, 'non-object body');
    checkOpenAIError(await http('POST', base + '/v1/completions', '\u0000\u0001binary', { raw: true }),
                     400, 'binary body');
    const big = { prompt: 'x'.repeat(100 * 1024), max_tokens: 1 };
    const e413 = checkOpenAIError(await http('POST', base + '/v1/completions', big), 413, 'oversized');
    check(e413.code === 'request_too_large', `oversized: code ${e413.code}`);
    checkOpenAIError(await http('GET', base + '/v1/completions'), 405, 'wrong method');
    checkOpenAIError(await http('GET', base + '/v1/nothing'), 404, 'unknown path');
    const nf = await http('POST', base + '/v1/completions', { model: 'no-such-model', prompt: 'x', max_tokens: 1 });
    checkOpenAIError(nf, 404, 'unknown model (passed on from the instance)');
    check(upstreams.includes(nf.headers.get('x-loom-instance')), 'unknown model: no x-loom-instance');
    // the instance validates what the gateway does not: its 400 comes back as is
    checkOpenAIError(await http('POST', base + '/v1/completions', { prompt: 'x', max_tokens: -5 }),
                     400, 'invalid max_tokens (from the instance)');
    log('errors: 400 garbage, 400 non-object, 413, 405, 404, instance 404 and 400 passed on');

    // drain one instance: nothing new goes there; undrain: it serves again
    const drained = upstreams[0];
    const d = await http('POST', `${base}/admin/drain?upstream=${encodeURIComponent(drained)}`);
    check(d.status === 200 && parseJson(d.text, 'drain').drained === true, `drain: ${d.text}`);
    const whileDrained = await Promise.all(Array.from({ length: 12 }, (_, i) =>
        generate({ chat: false, stream: i % 2 === 0, maxTokens: 3 })));
    for (const r of whileDrained) {
        check(r.status === 200, `while drained: ${r.status}`);
        check(r.instance !== drained, 'a drained instance got a request');
    }
    checkOpenAIError(await http('POST', `${base}/admin/drain?upstream=http://127.0.0.1:1`), 404,
                     'drain of an unknown upstream');
    const u = await http('POST', `${base}/admin/undrain?upstream=${encodeURIComponent(drained)}`);
    check(u.status === 200 && parseJson(u.text, 'undrain').drained === false, `undrain: ${u.text}`);
    /* concurrent, so that load (not only believed speed) decides */
    const afterUndrain = await Promise.all(Array.from({ length: 12 }, () =>
        generate({ chat: false, stream: false, maxTokens: 16 })));
    check(afterUndrain.some((r) => r.instance === drained), 'the undrained instance got no request');
    log('drain and undrain');

    // a client that disconnects mid-stream frees its instance
    const ctl = new AbortController();
    const gone = generate({ chat: false, stream: true, maxTokens: 1800, signal: ctl.signal,
                            onFirstFrame: () => ctl.abort() }).catch((e) => e);
    await gone;
    let busy = 1;
    for (let i = 0; i < 40 && busy > 0; i++) {
        await sleep(100);
        busy = (await Promise.all(upstreams.map(upstreamRunning))).reduce((a, v) => a + v, 0);
    }
    check(busy === 0, 'an instance still runs the request of a client that went away');
    const gm = parseMetrics((await http('GET', base + '/metrics')).text);
    check(sum(gm, 'loom:gateway_client_disconnects_total') >= 1, 'metrics: disconnect not counted');
    check(sum(gm, 'loom:gateway_in_flight') === 0, 'metrics: in flight after a disconnect');
    log('client disconnect closed its upstream request');
}

async function burst(n, outFile) {
    const reqs = Array.from({ length: n }, (_, i) => ({
        chat: i % 3 === 0, stream: i % 2 === 0, maxTokens: 24 + (i % 17),
        prompt: `request ${i}: once upon a time`,
    }));
    const summary = { sent: n, ok: 0, stream_error_events: 0, failed: 0, hung: 0, statuses: {},
                      instances: {} };
    const problems = [];
    await Promise.all(reqs.map(async (r, i) => {
        const ctl = new AbortController();
        const timer = setTimeout(() => ctl.abort(), 45000);
        try {
            const res = await generate({ ...r, signal: ctl.signal });
            summary.statuses[res.status] = (summary.statuses[res.status] || 0) + 1;
            if (res.instance) summary.instances[res.instance] = (summary.instances[res.instance] || 0) + 1;
            if (res.status !== 200) {
                summary.failed++;
                problems.push(`request ${i} (${r.stream ? 'stream' : 'plain'}): ${res.status} ${res.body?.slice(0, 160)}`);
            } else if (r.stream) {
                if (!res.done) {
                    summary.failed++;
                    problems.push(`request ${i}: stream ended without [DONE]`);
                } else if (res.errorEvent) {
                    summary.stream_error_events++;
                } else if (res.usage?.completion_tokens === r.maxTokens) {
                    summary.ok++;
                } else {
                    summary.failed++;
                    problems.push(`request ${i}: usage ${JSON.stringify(res.usage)}`);
                }
            } else if (res.usage?.completion_tokens === r.maxTokens) {
                summary.ok++;
            } else {
                summary.failed++;
                problems.push(`request ${i}: usage ${JSON.stringify(res.usage)}`);
            }
        } catch (e) {
            if (ctl.signal.aborted) summary.hung++;
            else summary.failed++;
            problems.push(`request ${i}: ${e}`);
        } finally {
            clearTimeout(timer);
        }
    }));
    console.log(`burst: ${JSON.stringify(summary)}`);
    if (outFile) writeFileSync(outFile, JSON.stringify(summary));
    for (const p of problems.slice(0, 10)) console.log(`  ${p}`);
    check(summary.hung === 0, `${summary.hung} requests hung`);
    check(summary.failed === 0, `${summary.failed} requests failed`);
    check(summary.ok + summary.stream_error_events === n, 'not every request answered once');
}

async function served(upstream, n) {
    /* in concurrent groups, so that load (not only believed speed) spreads them */
    const seen = new Map();
    for (let i = 0; i < n; i += 8) {
        const group = await Promise.all(Array.from({ length: Math.min(8, n - i) }, (_, k) =>
            generate({ chat: false, stream: k % 2 === 0, maxTokens: 16 })));
        for (const r of group) {
            check(r.status === 200, `request: ${r.status}`);
            seen.set(r.instance, (seen.get(r.instance) || 0) + 1);
        }
    }
    log(`served: ${[...seen].map(([u, k]) => `${u} ${k}`).join(', ')}`);
    check(seen.get(upstream) > 0, `${upstream} served none of ${n} requests`);
}

async function limits(key) {
    const auth = { Authorization: `Bearer ${key}` };
    checkOpenAIError(await http('GET', base + '/v1/models'), 401, 'models without a key');
    checkOpenAIError(await http('POST', base + '/v1/completions', { prompt: 'x' },
                                { headers: { Authorization: 'Bearer wrong' } }), 401, 'wrong key');
    checkOpenAIError(await http('GET', base + '/admin/upstreams'), 401, 'admin without a key');
    check((await http('GET', base + '/health')).status === 200, 'health needs no key');
    check((await http('GET', base + '/metrics')).status === 200, 'metrics need no key');
    // wait until the gateway knows the instance's KV size (from its /metrics)
    let cap = 0;
    for (let i = 0; i < 50 && !(cap > 0); i++) {
        const u = parseJson((await http('GET', base + '/admin/upstreams', undefined, { headers: auth })).text, 'upstreams');
        cap = u.upstreams[0].kv_capacity_tokens;
        if (!(cap > 0)) await sleep(100);
    }
    check(cap > 0, 'the gateway never learnt the KV size');
    log(`instance KV capacity ${cap} tokens`);
    const one = (i) => fetch(base + '/v1/completions', {
        method: 'POST', headers: { ...auth, 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompt: `request ${i}`, max_tokens: 2000, ignore_eos: true }),
    }).then(async (res) => ({ status: res.status, retry: res.headers.get('retry-after'),
                              text: await res.text(), at: Date.now() }));
    const first = one(0);
    await sleep(50); /* it is on the instance before the others arrive */
    const rest = [1, 2, 3, 4].map(one);
    const all = await Promise.all([first, ...rest]);
    check(all[0].status === 200, `the first: ${all[0].status} ${all[0].text.slice(0, 200)}`);
    const codes = all.slice(1).map((r) => {
        const e = checkOpenAIError(r, 503, 'over the queue');
        check(r.retry && Number(r.retry) >= 1, `503 without Retry-After: ${JSON.stringify(r)}`);
        return e.code;
    });
    codes.sort();
    check(JSON.stringify(codes) === '["queue_full","queue_full","queue_timeout","queue_timeout"]',
          `503 codes ${codes}`);
    log(`one served, 503s: ${codes.join(', ')}`);
    const m = parseMetrics((await http('GET', base + '/metrics')).text);
    check(sum(m, 'loom:gateway_rejected_total', (l) => l.reason === 'queue_full') === 2, 'metrics: queue_full');
    check(sum(m, 'loom:gateway_rejected_total', (l) => l.reason === 'queue_timeout') === 2, 'metrics: queue_timeout');
    check(sum(m, 'loom:gateway_queue_depth') === 0, 'metrics: queue not empty');
    const again = await Promise.all([5, 6].map(one));
    check(again.every((r) => r.status === 200 || r.status === 503), 'after the burst');
    check(again.some((r) => r.status === 200), 'nothing served after the burst');
    log('served again once the queue drained');
}

async function main() {
    if (phase === 'basic') await basic(arg3.split(','));
    else if (phase === 'burst') await burst(Number(arg3), arg4);
    else if (phase === 'served') await served(arg3, Number(arg4));
    else if (phase === 'limits') await limits(arg3);
    else fail(`unknown phase ${phase}`);
}

main().then(() => log('PASS'), (e) => {
    console.error(`FAIL: ${e.stack || e}`);
    process.exit(1);
});
