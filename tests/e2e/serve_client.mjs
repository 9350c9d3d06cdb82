// Client for tests/e2e/test_serve_api.sh: drives a running `loom serve` over loopback with
// Node's built-in fetch and checks every answer strictly.
//
//   node serve_client.mjs main   http://127.0.0.1:PORT
//   node serve_client.mjs limits http://127.0.0.1:PORT KEY
//
// "main": 64 concurrent mixed requests (completions/chat x stream/non-stream), usage counts,
// /metrics parsed strictly, clients killed mid-request free their KV blocks, error statuses.
// "limits": a server started with --api-key, --max-waiting 1, --max-num-seqs 1 and a small
// --max-body-bytes: 401, 413 and 503.
// Exits 0 when every check passes, 1 with the first failure otherwise.

const [phase, base, apiKey] = process.argv.slice(2);
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

async function http(method, path, body, { headers = {}, signal, raw = false } = {}) {
    const init = { method, headers: { ...headers }, signal };
    if (body !== undefined) {
        init.body = raw ? body : JSON.stringify(body);
        init.headers['Content-Type'] = 'application/json';
    }
    const res = await fetch(base + path, init);
    const text = await res.text();
    return { status: res.status, type: res.headers.get('content-type') || '', text, res };
}

function parseJson(text, what) {
    try {
        return JSON.parse(text);
    } catch (e) {
        fail(`${what}: not JSON: ${text.slice(0, 200)}`);
    }
}

// ------------------------------------------------------------------ Prometheus text format

// Strict parser for the text exposition format 0.0.4: every line is a HELP or TYPE comment or a
// sample; samples follow their family's TYPE; names and labels are well formed; histogram
// buckets are cumulative and end at +Inf == _count.
function parseMetrics(text) {
    check(text.endsWith('\n'), 'metrics: the page must end with a newline');
    const families = new Map(); // name -> {type, help}
    const samples = [];
    const nameRe = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
    const lines = text.slice(0, -1).split('\n');
    for (const line of lines) {
        if (line.startsWith('#')) {
            const m = /^# (HELP|TYPE) (\S+) (.+)$/.exec(line);
            check(m, `metrics: bad comment line: ${line}`);
            const [, kind, name, rest] = m;
            check(nameRe.test(name), `metrics: bad name in ${line}`);
            const f = families.get(name) || {};
            if (kind === 'HELP') {
                check(f.help === undefined, `metrics: second HELP for ${name}`);
                f.help = rest;
            } else {
                check(f.type === undefined, `metrics: second TYPE for ${name}`);
                check(['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(rest),
                      `metrics: bad type in ${line}`);
                f.type = rest;
            }
            families.set(name, f);
            continue;
        }
        check(line.length > 0, 'metrics: empty line');
        const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)( -?\d+)?$/.exec(line);
        check(m, `metrics: bad sample line: ${line}`);
        const [, name, , labelText = '', valueText] = m;
        const labels = {};
        let rest = labelText;
        while (rest.length) {
            const lm = /^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\[\\"n])*)"(,|$)/.exec(rest);
            check(lm, `metrics: bad labels in ${line}`);
            check(!(lm[1] in labels), `metrics: repeated label in ${line}`);
            labels[lm[1]] = lm[2].replace(/\\n/g, '\n').replace(/\\(["\\])/g, '$1');
            rest = rest.slice(lm[0].length);
        }
        let value;
        if (valueText === '+Inf') value = Infinity;
        else if (valueText === '-Inf') value = -Infinity;
        else if (valueText === 'NaN') value = NaN;
        else {
            check(/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(valueText),
                  `metrics: bad value in ${line}`);
            value = Number(valueText);
        }
        let family = name;
        if (!families.has(name)) {
            const hm = /^(.*)_(bucket|sum|count)$/.exec(name);
            check(hm && families.get(hm[1])?.type === 'histogram',
                  `metrics: sample without a # TYPE: ${line}`);
            family = hm[1];
        }
        check(families.get(family).type, `metrics: sample before its # TYPE: ${line}`);
        if (families.get(family).type === 'counter')
            check(name.endsWith('_total'), `metrics: counter without _total: ${name}`);
        samples.push({ name, family, labels, value });
    }
    // histogram consistency
    for (const [fname, f] of families) {
        if (f.type !== 'histogram') continue;
        const buckets = samples.filter((s) => s.name === fname + '_bucket');
        check(buckets.length > 1, `metrics: ${fname} has no buckets`);
        let prev = -1, prevLe = -Infinity;
        for (const b of buckets) {
            check('le' in b.labels, `metrics: ${fname} bucket without le`);
            const le = b.labels.le === '+Inf' ? Infinity : Number(b.labels.le);
            check(le > prevLe, `metrics: ${fname} buckets not in increasing le order`);
            check(b.value >= prev, `metrics: ${fname} buckets not cumulative`);
            prev = b.value;
            prevLe = le;
        }
        check(prevLe === Infinity, `metrics: ${fname} does not end with le="+Inf"`);
        const count = samples.find((s) => s.name === fname + '_count');
        check(samples.find((s) => s.name === fname + '_sum'), `metrics: ${fname}_sum missing`);
        check(count && count.value === prev, `metrics: ${fname} +Inf bucket != _count`);
    }
    return { families, samples };
}

async function metrics() {
    const r = await http('GET', '/metrics');
    check(r.status === 200, `/metrics: status ${r.status}`);
    check(r.type.startsWith('text/plain'), `/metrics: content-type ${r.type}`);
    return parseMetrics(r.text);
}

function metric(m, name, labels = {}) {
    const found = m.samples.filter((s) => s.name === name &&
        Object.entries(labels).every(([k, v]) => s.labels[k] === v));
    check(found.length === 1, `metrics: expected one ${name} ${JSON.stringify(labels)}, ` +
          `found ${found.length}`);
    return found[0].value;
}

const REQUIRED = [
    ['vllm:num_requests_running', 'gauge'], ['vllm:num_requests_waiting', 'gauge'],
    ['vllm:kv_cache_usage_perc', 'gauge'], ['vllm:prompt_tokens_total', 'counter'],
    ['vllm:generation_tokens_total', 'counter'], ['vllm:prefix_cache_hits_total', 'counter'],
    ['vllm:prefix_cache_queries_total', 'counter'], ['vllm:num_preemptions_total', 'counter'],
    ['vllm:request_success_total', 'counter'],
    ['vllm:time_to_first_token_seconds', 'histogram'],
    ['vllm:time_per_output_token_seconds', 'histogram'],
    ['vllm:e2e_request_latency_seconds', 'histogram'],
];

function checkMetricNames(m, model) {
    for (const [name, type] of REQUIRED) {
        const f = m.families.get(name);
        check(f, `metrics: ${name} missing`);
        check(f.type === type, `metrics: ${name} is ${f.type}, want ${type}`);
        check(f.help, `metrics: ${name} has no HELP`);
    }
    for (const s of m.samples.filter((x) => x.name.startsWith('vllm:'))) {
        check(s.labels.model_name === model, `metrics: ${s.name} model_name=${s.labels.model_name}`);
        check(s.labels.engine === '0', `metrics: ${s.name} lacks engine="0"`);
    }
    const kv = metric(m, 'vllm:kv_cache_usage_perc');
    check(kv >= 0 && kv <= 1, `metrics: kv_cache_usage_perc ${kv} not in [0,1]`);
}

// Polls /metrics until no request runs or waits and the KV cache is empty again.
async function waitIdle(what, ms = 10000) {
    const until = Date.now() + ms;
    let m;
    for (;;) {
        m = await metrics();
        const running = metric(m, 'vllm:num_requests_running');
        const waiting = metric(m, 'vllm:num_requests_waiting');
        const kv = metric(m, 'vllm:kv_cache_usage_perc');
        if (running === 0 && waiting === 0 && kv === 0) return m;
        if (Date.now() > until)
            fail(`${what}: still running=${running} waiting=${waiting} kv=${kv} after ${ms} ms`);
        await sleep(50);
    }
}

// ------------------------------------------------------------------ responses

function checkError(r, status, what) {
    check(r.status === status, `${what}: status ${r.status}, want ${status}: ${r.text.slice(0, 200)}`);
    check(r.type.startsWith('application/json'), `${what}: error content-type ${r.type}`);
    const j = parseJson(r.text, what);
    check(j.error && typeof j.error === 'object', `${what}: no error object`);
    check(typeof j.error.message === 'string' && j.error.message.length > 0,
          `${what}: no error message`);
    for (const k of ['type', 'param', 'code'])
        check(k in j.error, `${what}: error has no '${k}'`);
    return j.error;
}

function checkUsage(u, what) {
    check(u && Number.isInteger(u.prompt_tokens) && Number.isInteger(u.completion_tokens) &&
          u.total_tokens === u.prompt_tokens + u.completion_tokens, `${what}: bad usage ${JSON.stringify(u)}`);
    check(u.prompt_tokens > 0, `${what}: prompt_tokens ${u.prompt_tokens}`);
}

function checkBody(j, kind, model, what) {
    const chat = kind === 'chat';
    check(typeof j.id === 'string' && j.id.startsWith(chat ? 'chatcmpl-' : 'cmpl-'), `${what}: id ${j.id}`);
    check(j.object === (chat ? 'chat.completion' : 'text_completion'), `${what}: object ${j.object}`);
    check(Number.isInteger(j.created) && j.created > 1.6e9, `${what}: created ${j.created}`);
    check(j.model === model, `${what}: model ${j.model}`);
    check(Array.isArray(j.choices) && j.choices.length === 1, `${what}: choices`);
    const c = j.choices[0];
    check(c.index === 0, `${what}: index`);
    if (chat) {
        check(c.message && c.message.role === 'assistant' && typeof c.message.content === 'string',
              `${what}: message ${JSON.stringify(c.message)}`);
    } else {
        check(typeof c.text === 'string', `${what}: text`);
    }
    check('logprobs' in c, `${what}: no logprobs field`);
    check(['stop', 'length'].includes(c.finish_reason), `${what}: finish_reason ${c.finish_reason}`);
    checkUsage(j.usage, what);
    return c;
}

// Reads an SSE response to the end (or until onChunk returns false: then the rest is left
// unread, the connection open). Returns the JSON chunks and whether [DONE] closed the stream.
async function readSse(res, what, onChunk) {
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = '', chunks = [], done = false;
    for (;;) {
        const { value, done: eof } = await reader.read();
        if (eof) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
            const frame = buf.slice(0, i);
            buf = buf.slice(i + 2);
            check(frame.startsWith('data: '), `${what}: frame without 'data: ': ${frame.slice(0, 80)}`);
            check(!frame.slice(6).includes('\n'), `${what}: multi-line frame`);
            check(!done, `${what}: frame after [DONE]`);
            const data = frame.slice(6);
            if (data === '[DONE]') {
                done = true;
                continue;
            }
            const j = parseJson(data, what);
            chunks.push(j);
            if (onChunk && onChunk(j) === false) {
                // stop reading but keep the connection: cancel() would close it
                reader.releaseLock();
                return { chunks, done };
            }
        }
    }
    check(buf === '', `${what}: trailing bytes after the last frame: ${buf.slice(0, 80)}`);
    return { chunks, done };
}

// Checks a finished stream; returns {text, usage, tokens} (tokens: from logprobs, if asked).
function checkStream({ chunks, done }, kind, model, includeUsage, what) {
    const chat = kind === 'chat';
    check(done, `${what}: no data: [DONE]`);
    check(chunks.length >= 2, `${what}: only ${chunks.length} chunks`);
    const id = chunks[0].id;
    check(typeof id === 'string' && id.startsWith(chat ? 'chatcmpl-' : 'cmpl-'), `${what}: id ${id}`);
    let text = '', finishAt = -1, usage = null, tokens = 0, sawLogprobs = false;
    chunks.forEach((c, i) => {
        check(c.id === id, `${what}: chunk ${i} id differs`);
        check(c.object === (chat ? 'chat.completion.chunk' : 'text_completion'), `${what}: chunk object ${c.object}`);
        check(c.model === model, `${what}: chunk model`);
        check(Number.isInteger(c.created), `${what}: chunk created`);
        check(Array.isArray(c.choices), `${what}: chunk ${i} choices`);
        if (c.choices.length === 0) {
            check(includeUsage && i === chunks.length - 1 && finishAt >= 0,
                  `${what}: unexpected usage chunk at ${i}`);
            usage = c.usage;
            return;
        }
        check(finishAt < 0, `${what}: chunk after the finish_reason chunk`);
        check(c.choices.length === 1 && c.choices[0].index === 0, `${what}: chunk ${i} choice`);
        const ch = c.choices[0];
        if (chat) {
            check(ch.delta && typeof ch.delta === 'object', `${what}: chunk ${i} delta`);
            if (i === 0) check(ch.delta.role === 'assistant', `${what}: first chunk has no role`);
            if (ch.delta.content !== undefined) text += ch.delta.content;
            if (ch.logprobs) tokens += ch.logprobs.content.length, sawLogprobs = true;
        } else {
            check(typeof ch.text === 'string', `${what}: chunk ${i} text`);
            text += ch.text;
            if (ch.logprobs) tokens += ch.logprobs.tokens.length, sawLogprobs = true;
        }
        if (ch.finish_reason !== null) {
            check(['stop', 'length'].includes(ch.finish_reason), `${what}: finish ${ch.finish_reason}`);
            finishAt = i;
        }
    });
    check(finishAt >= 0, `${what}: no chunk with a finish_reason`);
    if (includeUsage) {
        check(usage, `${what}: include_usage but no usage chunk`);
        checkUsage(usage, what);
    }
    return { text, usage, tokens: sawLogprobs ? tokens : null };
}

// ------------------------------------------------------------------ phases

async function phaseMain() {
    const models = await http('GET', '/v1/models');
    check(models.status === 200, `/v1/models: ${models.status}`);
    const mj = parseJson(models.text, '/v1/models');
    check(mj.object === 'list' && mj.data.length === 1, '/v1/models: list of one');
    const card = mj.data[0];
    const model = card.id;
    check(card.object === 'model' && card.owned_by === 'loom', '/v1/models: object/owned_by');
    check(Number.isInteger(card.max_model_len) && card.max_model_len > 64, '/v1/models: max_model_len');
    check(card.backend === 'cpu', `/v1/models: backend ${card.backend}`);
    const maxLen = card.max_model_len;
    log(`model ${model}, max_model_len ${maxLen}`);

    const m0 = await metrics();
    checkMetricNames(m0, model);

    // usage.prompt_tokens is the tokenized length: exact for a token-id prompt...
    const ids = [40, 41, 42, 43, 44, 45, 46];
    let r = await http('POST', '/v1/completions', { model, prompt: ids, max_tokens: 5,
        temperature: 0, ignore_eos: true, logprobs: 2 });
    check(r.status === 200, `token-id prompt: ${r.status} ${r.text}`);
    let j = parseJson(r.text, 'token-id prompt');
    let c = checkBody(j, 'completion', model, 'token-id prompt');
    check(j.usage.prompt_tokens === ids.length, `prompt_tokens ${j.usage.prompt_tokens} != ${ids.length}`);
    check(j.usage.completion_tokens === 5, `completion_tokens ${j.usage.completion_tokens} != 5`);
    check(c.finish_reason === 'length', 'token-id prompt: finish_reason');
    const lp = c.logprobs;
    check(lp && lp.tokens.length === 5 && lp.token_logprobs.length === 5 &&
          lp.top_logprobs.length === 5 && lp.text_offset.length === 5, 'logprobs: 5 entries each');
    check(lp.token_logprobs.every((x) => x <= 0), 'logprobs: positive logprob');
    check(lp.top_logprobs.every((t) => Object.keys(t).length >= 1 && Object.keys(t).length <= 2),
          'logprobs: top-2');
    for (let i = 1; i < 5; i++) check(lp.text_offset[i] >= lp.text_offset[i - 1], 'text_offset order');
    let expectedSuccess = 1, expectedGen = 5;

    // ... and the same for a text prompt whichever way it is sent
    const textPrompt = 'The quick brown fox jumps over the lazy dog';
    r = await http('POST', '/v1/completions', { prompt: textPrompt, max_tokens: 3, ignore_eos: true });
    j = parseJson(r.text, 'text prompt');
    checkBody(j, 'completion', model, 'text prompt');
    const textPromptTokens = j.usage.prompt_tokens;
    check(textPromptTokens <= Buffer.byteLength(textPrompt) + 2, 'text prompt: too many tokens');
    r = await fetch(base + '/v1/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompt: textPrompt, max_tokens: 3, ignore_eos: true, stream: true,
            stream_options: { include_usage: true } }) });
    check(r.status === 200 && r.headers.get('content-type').startsWith('text/event-stream'), 'stream: content-type');
    let s = checkStream(await readSse(r, 'text prompt stream'), 'completion', model, true, 'text prompt stream');
    check(s.usage.prompt_tokens === textPromptTokens, `stream prompt_tokens ${s.usage.prompt_tokens} != ${textPromptTokens}`);
    check(s.usage.completion_tokens === 3, 'stream completion_tokens');
    expectedSuccess += 2, expectedGen += 6;

    // 64 concurrent requests: completions and chat, streaming and not
    const N = 64;
    const jobs = [];
    for (let i = 0; i < N; i++) {
        const kind = i % 2 ? 'chat' : 'completion';
        const stream = (i >> 1) % 2 === 1;
        const maxTokens = 4 + ((i * 7) % 21);
        const body = { model, max_tokens: maxTokens, ignore_eos: true,
            temperature: i % 3 ? 0.8 : 0, seed: i };
        const words = `request ${i}: ` + 'lorem ipsum dolor sit amet '.repeat(1 + (i % 5));
        if (kind === 'chat') body.messages = [{ role: 'user', content: words }];
        else body.prompt = words;
        let mode = 'usage';
        if (stream) {
            body.stream = true;
            if (i % 8 < 4) body.stream_options = { include_usage: true };
            else if (kind === 'chat') body.logprobs = true, mode = 'logprobs';
            else body.logprobs = 0, mode = 'logprobs';
        }
        jobs.push({ i, kind, stream, maxTokens, body, mode });
    }
    const path = (k) => (k === 'chat' ? '/v1/chat/completions' : '/v1/completions');
    const t1 = Date.now();
    const results = await Promise.all(jobs.map(async (job) => {
        const what = `request ${job.i} (${job.kind}${job.stream ? ', stream' : ''})`;
        const res = await fetch(base + path(job.kind), { method: 'POST',
            headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(job.body) });
        if (!job.stream) {
            const text = await res.text();
            check(res.status === 200, `${what}: status ${res.status}: ${text}`);
            check(res.headers.get('content-type').startsWith('application/json'), `${what}: content-type`);
            const body = parseJson(text, what);
            const ch = checkBody(body, job.kind, model, what);
            check(ch.finish_reason === 'length', `${what}: finish ${ch.finish_reason} (ignore_eos)`);
            check(body.usage.completion_tokens === job.maxTokens,
                  `${what}: completion_tokens ${body.usage.completion_tokens} != ${job.maxTokens}`);
            return { id: body.id, completion: body.usage.completion_tokens, prompt: body.usage.prompt_tokens };
        }
        check(res.status === 200, `${what}: status ${res.status}`);
        check(res.headers.get('content-type').startsWith('text/event-stream'), `${what}: content-type`);
        const sse = await readSse(res, what);
        const st = checkStream(sse, job.kind, model, job.mode === 'usage', what);
        const generated = job.mode === 'usage' ? st.usage.completion_tokens : st.tokens;
        check(generated === job.maxTokens, `${what}: generated ${generated} != ${job.maxTokens}`);
        return { id: sse.chunks[0].id, completion: generated, prompt: st.usage ? st.usage.prompt_tokens : null };
    }));
    check(results.length === N, 'not every request answered');
    check(new Set(results.map((x) => x.id)).size === N, 'response ids are not unique');
    const genTotal = results.reduce((a, x) => a + x.completion, 0);
    log(`${N} concurrent requests answered in ${Date.now() - t1} ms, ${genTotal} tokens`);
    expectedSuccess += N, expectedGen += genTotal;

    // the counters moved by exactly what we did
    let m1 = await waitIdle('after the concurrent requests');
    checkMetricNames(m1, model);
    const delta = (name, labels) => metric(m1, name, labels) - metric(m0, name, labels);
    check(delta('vllm:request_success_total', { finished_reason: 'length' }) === expectedSuccess,
          `request_success_total{length} moved by ${delta('vllm:request_success_total', { finished_reason: 'length' })}, want ${expectedSuccess}`);
    check(delta('vllm:generation_tokens_total') === expectedGen,
          `generation_tokens_total moved by ${delta('vllm:generation_tokens_total')}, want ${expectedGen}`);
    check(delta('vllm:time_to_first_token_seconds_count') === expectedSuccess, 'ttft count');
    check(delta('vllm:e2e_request_latency_seconds_count') === expectedSuccess, 'e2e count');
    check(delta('vllm:prompt_tokens_total') > 0, 'prompt_tokens_total did not move');

    // a client killed mid-stream: its blocks are freed
    const aborts0 = metric(m1, 'vllm:request_success_total', { finished_reason: 'abort' });
    const ctl = new AbortController();
    const long = await fetch(base + '/v1/completions', { method: 'POST', signal: ctl.signal,
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompt: 'tell me a long story', max_tokens: maxLen - 64,
            ignore_eos: true, stream: true }) });
    check(long.status === 200, `long stream: ${long.status}`);
    let seen = 0;
    await readSse(long, 'long stream', () => ++seen < 3);
    const busy = await metrics();
    check(metric(busy, 'vllm:num_requests_running') >= 1, 'long stream: not running');
    check(metric(busy, 'vllm:kv_cache_usage_perc') > 0, 'long stream: no KV in use');
    ctl.abort();
    m1 = await waitIdle('after killing a streaming client');
    check(metric(m1, 'vllm:request_success_total', { finished_reason: 'abort' }) === aborts0 + 1,
          'abort not counted');
    log('killed stream: KV usage back to 0');

    // a client that gives up on a non-streaming request
    const ctl2 = new AbortController();
    const pending = fetch(base + '/v1/completions', { method: 'POST', signal: ctl2.signal,
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ prompt: 'another long story', max_tokens: maxLen - 64, ignore_eos: true }) })
        .then(() => 'answered', (e) => e.name);
    for (let k = 0; k < 100; k++) {
        const mm = await metrics();
        if (metric(mm, 'vllm:kv_cache_usage_perc') > 0) break;
        await sleep(20);
    }
    ctl2.abort();
    check((await pending) === 'AbortError', 'non-streaming request finished before we gave up');
    m1 = await waitIdle('after a non-streaming client gave up');
    check(metric(m1, 'vllm:request_success_total', { finished_reason: 'abort' }) === aborts0 + 2,
          'second abort not counted');
    log('abandoned non-streaming request: KV usage back to 0');

    // errors
    const post = (p, body, opts) => http('POST', p, body, opts);
    checkError(await post('/v1/completions', '{"prompt": "x"', { raw: true }), 400, 'malformed JSON');
    checkError(await post('/v1/chat/completions', 'nope', { raw: true }), 400, 'malformed chat JSON');
    let e = checkError(await post('/v1/completions', { prompt: 'x', max_tokens: 'ten' }), 400, 'wrong type');
    check(e.type === 'invalid_request_error' && e.param === 'max_tokens', 'wrong type: param');
    checkError(await post('/v1/completions', { prompt: 'x', temperature: -1 }), 400, 'bad temperature');
    checkError(await post('/v1/completions', { prompt: 'x', n: 2 }), 400, 'n=2');
    checkError(await post('/v1/completions', { prompt: 'x', echo: true }), 400, 'echo');
    checkError(await post('/v1/chat/completions', { messages: [] }), 400, 'empty messages');
    checkError(await post('/v1/chat/completions', { messages: [{ role: 'user', content: 5 }] }), 400, 'bad content');
    e = checkError(await post('/v1/completions', { model: 'no-such-model', prompt: 'x' }), 404, 'unknown model');
    check(e.code === 'model_not_found', 'unknown model: code');
    e = checkError(await post('/v1/completions', { prompt: 'x', max_tokens: maxLen }), 400, 'over the context');
    check(e.code === 'context_length_exceeded', 'over the context: code');
    checkError(await post('/v1/chat/completions', { messages: [{ role: 'user', content: 'x' }],
        max_tokens: maxLen }), 400, 'chat over the context');
    checkError(await http('GET', '/v1/nothing'), 404, 'unknown path');
    checkError(await http('GET', '/v1/completions'), 405, 'GET completions');
    checkError(await post('/v1/models', {}), 405, 'POST models');
    checkError(await post('/health', {}), 405, 'POST health');
    const h = await http('GET', '/health');
    check(h.status === 200 && h.text === 'ok', `/health: ${h.status} ${h.text}`);
    m1 = await waitIdle('at the end');
    check(metric(m1, 'vllm:request_success_total', { finished_reason: 'length' }) -
          metric(m0, 'vllm:request_success_total', { finished_reason: 'length' }) === expectedSuccess,
          'errors must not count as successes');
}

async function phaseLimits() {
    const auth = { Authorization: `Bearer ${apiKey}` };
    // 401 without or with a wrong key; /health and /metrics stay open
    let e = checkError(await http('GET', '/v1/models'), 401, 'no key');
    check(e.code === 'invalid_api_key', 'no key: code');
    checkError(await http('GET', '/v1/models', undefined, { headers: { Authorization: 'Bearer wrong' } }), 401, 'wrong key');
    checkError(await http('POST', '/v1/completions', { prompt: 'x' }), 401, 'no key, completions');
    let r = await http('GET', '/v1/models', undefined, { headers: auth });
    check(r.status === 200, `with key: ${r.status}`);
    const model = parseJson(r.text, 'models').data[0].id;
    check((await http('GET', '/health')).status === 200, '/health needs no key');
    await metrics();

    // 413 over --max-body-bytes (4096)
    e = checkError(await http('POST', '/v1/completions', { prompt: 'x'.repeat(5000) }, { headers: auth }),
                   413, 'body over the limit');
    r = await http('POST', '/v1/completions', { prompt: 'y'.repeat(100), max_tokens: 2 }, { headers: auth });
    check(r.status === 200, `small body: ${r.status} ${r.text}`);

    // 503 over --max-waiting (1) with --max-num-seqs 1: at most two of these are taken
    const ctls = [], opened = [];
    const tries = await Promise.all([0, 1, 2, 3].map(async (i) => {
        const ctl = new AbortController();
        ctls.push(ctl);
        const res = await fetch(base + '/v1/completions', { method: 'POST', signal: ctl.signal,
            headers: { 'Content-Type': 'application/json', ...auth },
            body: JSON.stringify({ model, prompt: `queue ${i}`, max_tokens: 1500, ignore_eos: true, stream: true }) });
        if (res.status === 200) {
            opened.push(res);
            return 200;
        }
        checkError({ status: res.status, type: res.headers.get('content-type') || '', text: await res.text() },
                   503, 'over --max-waiting');
        return res.status;
    }));
    const n503 = tries.filter((s) => s === 503).length;
    check(n503 >= 2 && tries.length - n503 >= 1, `statuses ${tries}: want at least two 503 and one 200`);
    log(`max-waiting: statuses ${tries.join(',')}`);
    for (const c of ctls) c.abort();
    await waitIdle('after aborting the queued streams');
}

// The server prints its address once it listens; /health says when its engine thread runs.
async function waitHealthy(ms = 10000) {
    const until = Date.now() + ms;
    for (;;) {
        try {
            const r = await http('GET', '/health');
            if (r.status === 200) return;
        } catch (e) {
            /* not accepting yet */
        }
        if (Date.now() > until) fail(`/health not 200 after ${ms} ms`);
        await sleep(50);
    }
}

const phases = { main: phaseMain, limits: phaseLimits };
if (!phases[phase] || !base) {
    console.error('usage: node serve_client.mjs main|limits BASE_URL [KEY]');
    process.exit(2);
}
waitHealthy().then(phases[phase]).then(() => {
    log(`${phase}: all checks passed`);
    process.exit(0);
}, (err) => {
    console.error(`FAIL (${phase}): ${err.message}`);
    process.exit(1);
});
