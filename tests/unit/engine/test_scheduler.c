/*
 * Engine scheduler with a fake backend (fake_backend.h): lifecycle invariants over random
 * workloads (every accepted request finishes exactly once, tokens conserved, budget and
 * max_num_seqs respected, KV tables right), chunked prefill, preemption under a tiny cache,
 * prefix caching, min_tokens / ignore_eos, aborts and backend failures.
 */
#include "fake_backend.h"
#include "loom/engine.h"
#include "testlib.h"

enum { VOCAB = 64, EOS = 2, MAX_LEN = 256, MAX_OUT = 64, MAX_PROMPT = 64 };

typedef struct rec {
    int32_t prompt[MAX_PROMPT];
    int n_prompt;
    sampling_params p;
    int arrival;  /* step at which it is added */
    int abort_at; /* step at which it is aborted, -1 never */
    /* results */
    bool accepted;
    int32_t out[MAX_OUT];
    int n_out;
    int n_finish;
    finish_reason finish;
    int cached_tokens;
} rec;

typedef struct run_result {
    engine_stats stats;
    int steps;
    int max_batch_tokens, max_batch_seqs, n_partial_chunks, kv_errors;
} run_result;

static void engine_check_ok(const engine *en)
{
    loom_err e = {0};
    if (engine_check(en, &e))
        fail_msg("engine_check: %s", e.msg);
}

/* Runs the requests through an engine with cfg; checks the lifecycle invariants as it goes. */
static void run(const engine_config *cfg, rec *recs, int n, run_result *res,
                void (*tweak)(fake_backend *))
{
    fake_backend *f;
    engine_backend be = fake_backend_create(cfg->num_kv_blocks, cfg->block_size, VOCAB, &f);
    if (tweak)
        tweak(f);
    model_config mc = fake_model_config(VOCAB, MAX_LEN, EOS);
    engine *en;
    loom_err e = {0};
    assert_int_equal(engine_create(cfg, &mc, be, NULL, &en, &e), 0);
    for (int i = 0; i < n; i++) {
        recs[i].accepted = false;
        recs[i].n_out = recs[i].n_finish = 0;
        recs[i].finish = FINISH_NONE;
    }
    int last_arrival = 0;
    for (int i = 0; i < n; i++)
        if (recs[i].arrival > last_arrival)
            last_arrival = recs[i].arrival;
    uint64_t tokens_seen = 0;
    int step = 0;
    for (; step <= last_arrival || engine_has_work(en); step++) {
        assert_true(step < 100000);
        for (int i = 0; i < n; i++) {
            if (recs[i].arrival == step) {
                int rc =
                    engine_add(en, (uint64_t)i, recs[i].prompt, recs[i].n_prompt, &recs[i].p, &e);
                if (rc)
                    fail_msg("engine_add %d: %s", i, e.msg);
                recs[i].accepted = true;
            }
            if (recs[i].abort_at == step)
                engine_abort(en, (uint64_t)i);
        }
        engine_abort(en, 987654321); /* unknown ids are ignored */
        const engine_event *ev;
        int n_ev;
        double secs;
        assert_int_equal(engine_step(en, &ev, &n_ev, &secs, &e), 0);
        for (int k = 0; k < n_ev; k++) {
            assert_true(ev[k].req_id < (uint64_t)n);
            rec *r = &recs[ev[k].req_id];
            assert_true(r->accepted);
            assert_int_equal(r->n_finish, 0); /* nothing after the finishing event */
            if (ev[k].token >= 0) {
                assert_true(ev[k].token < VOCAB);
                assert_true(r->n_out < MAX_OUT);
                r->out[r->n_out++] = ev[k].token;
                tokens_seen++;
                assert_int_equal(ev[k].first_token, r->n_out == 1);
            }
            assert_int_equal(ev[k].completion_tokens, r->n_out);
            assert_int_equal(ev[k].prompt_tokens, r->n_prompt);
            assert_true(ev[k].text != NULL && ev[k].text_len == 0); /* no tokenizer */
            if (ev[k].finish != FINISH_NONE) {
                r->n_finish++;
                r->finish = ev[k].finish;
                r->cached_tokens = ev[k].cached_tokens;
            }
        }
        engine_check_ok(en);
        engine_stats st;
        engine_get_stats(en, &st);
        assert_true(st.num_running <= cfg->max_num_seqs);
        assert_int_equal(st.generation_tokens_total, tokens_seen);
    }
    engine_get_stats(en, &res->stats);
    res->steps = step;
    res->max_batch_tokens = f->max_batch_tokens;
    res->max_batch_seqs = f->max_batch_seqs;
    res->n_partial_chunks = f->n_partial_chunks;
    res->kv_errors = f->kv_errors;
    assert_true(f->max_batch_tokens <= cfg->max_num_batched_tokens);
    assert_true(f->max_batch_seqs <= cfg->max_num_seqs);
    assert_int_equal(f->kv_errors, 0);
    /* all done: nothing running or waiting, every block free */
    assert_int_equal(res->stats.num_running, 0);
    assert_int_equal(res->stats.num_waiting, 0);
    assert_int_equal(res->stats.num_free_blocks, cfg->num_kv_blocks);
    assert_true(res->stats.kv_usage == 0.0);
    for (int i = 0; i < n; i++) {
        rec *r = &recs[i];
        assert_true(r->accepted);
        if (r->n_finish != 1)
            fail_msg("request %d finished %d times", i, r->n_finish);
        switch (r->finish) {
        case FINISH_LENGTH:
            assert_int_equal(r->n_out, r->p.max_tokens);
            break;
        case FINISH_STOP:
            assert_false(r->p.ignore_eos);
            assert_int_equal(r->out[r->n_out - 1], EOS);
            assert_true(r->n_out > r->p.min_tokens);
            break;
        case FINISH_ABORT:
            assert_true(r->abort_at >= 0);
            break;
        default:
            fail_msg("request %d: unexpected finish %d", i, r->finish);
        }
        /* min_tokens: no EOS among the first min_tokens tokens */
        for (int k = 0; k < r->n_out && k < r->p.min_tokens; k++)
            assert_int_not_equal(r->out[k], EOS);
    }
    engine_free(en);
}

static engine_config config(int block_size, int blocks, int max_seqs, int budget)
{
    engine_config c;
    engine_config_default(&c);
    c.block_size = block_size;
    c.num_kv_blocks = blocks;
    c.max_num_seqs = max_seqs;
    c.max_num_batched_tokens = budget;
    c.max_model_len = MAX_LEN;
    return c;
}

static void greedy_params(sampling_params *p, int max_tokens, bool ignore_eos)
{
    sampling_params_default(p);
    p->temperature = 0;
    p->max_tokens = max_tokens;
    p->ignore_eos = ignore_eos;
}

/* Random workload: prompts from three families (shared prefixes), greedy, seeded and unseeded
 * sampling, ignore_eos, min_tokens, staggered arrivals, some aborts. */
static int make_workload(rec *recs, int n, uint64_t seed, bool with_aborts)
{
    loom_rng rng;
    rng_seed(&rng, seed);
    int32_t fam[3][MAX_PROMPT];
    for (int f = 0; f < 3; f++)
        for (int i = 0; i < MAX_PROMPT; i++)
            fam[f][i] = 3 + (int32_t)(rng_next(&rng) % (VOCAB - 3));
    for (int i = 0; i < n; i++) {
        rec *r = &recs[i];
        memset(r, 0, sizeof(*r));
        int f = (int)(rng_next(&rng) % 3);
        r->n_prompt = 1 + (int)(rng_next(&rng) % 40);
        int split = (int)(rng_next(&rng) % 48);
        for (int k = 0; k < r->n_prompt; k++)
            r->prompt[k] = k < split ? fam[f][k] : 3 + (int32_t)(rng_next(&rng) % (VOCAB - 3));
        sampling_params_default(&r->p);
        r->p.max_tokens = 1 + (int)(rng_next(&rng) % 24);
        r->p.min_tokens = (int)(rng_next(&rng) % 4);
        if (r->p.min_tokens > r->p.max_tokens)
            r->p.min_tokens = r->p.max_tokens;
        r->p.ignore_eos = rng_next(&rng) % 3 == 0;
        int kind = (int)(rng_next(&rng) % 10);
        if (kind < 5) {
            r->p.temperature = 0;
        } else if (kind < 9) {
            r->p.temperature = 0.8f;
            r->p.top_p = 0.9f;
            r->p.top_k = kind == 8 ? 5 : 0;
            r->p.seed = (int64_t)(rng_next(&rng) % 1000);
        } else {
            r->p.temperature = 1.0f; /* unseeded: the engine's rng, order dependent */
        }
        r->p.logprobs = kind == 3 ? 3 : -1;
        r->arrival = (int)(rng_next(&rng) % 30);
        r->abort_at =
            with_aborts && rng_next(&rng) % 10 == 0 ? r->arrival + (int)(rng_next(&rng) % 8) : -1;
    }
    return n;
}

static bool comparable(const rec *r)
{
    return r->abort_at < 0 && (r->p.temperature == 0 || r->p.seed >= 0);
}

/* Outputs of deterministic requests do not depend on batching, budget, cache size or
 * preemption: compare a stressed configuration with one request at a time. */
static void test_random_workloads(void **state)
{
    enum { N = 50 };
    static rec a[N], b[N];
    for (uint64_t seed = 1; seed <= 4; seed++) {
        make_workload(a, N, seed, true);
        memcpy(b, a, sizeof(a));
        run_result ra, rb;
        /* tiny cache (16 blocks = the largest request), small budget, 5 sequences */
        engine_config tight = config(4, 16, 5, 12);
        tight.enable_prefix_caching = seed % 2 == 1;
        run(&tight, a, N, &ra, NULL);
        engine_config solo = config(4, 400, 1, 512);
        run(&solo, b, N, &rb, NULL);
        assert_true(ra.stats.num_preempted_total > 0);
        assert_true(ra.n_partial_chunks > 0);
        assert_int_equal(rb.stats.num_preempted_total, 0);
        int compared = 0;
        for (int i = 0; i < N; i++) {
            if (!comparable(&a[i]))
                continue;
            compared++;
            assert_int_equal(a[i].n_out, b[i].n_out);
            assert_memory_equal(a[i].out, b[i].out, (size_t)a[i].n_out * sizeof(int32_t));
            assert_int_equal(a[i].finish, b[i].finish);
            if (a[i].p.temperature == 0) {
                int32_t want[MAX_OUT];
                fake_backend ref = {.vocab = VOCAB, .favored = -1};
                int nw = fake_reference_greedy(&ref, a[i].prompt, a[i].n_prompt, a[i].p.max_tokens,
                                               EOS, a[i].p.ignore_eos, want);
                /* the reference knows no min_tokens; requests where EOS came first differ */
                bool eos_early = false;
                for (int k = 0; k < nw && k < a[i].p.min_tokens; k++)
                    eos_early |= want[k] == EOS;
                if (!eos_early) {
                    assert_int_equal(a[i].n_out, nw);
                    assert_memory_equal(a[i].out, want, (size_t)nw * sizeof(int32_t));
                }
            }
        }
        printf("seed %d: preempt %d hits %llu/%llu partial %d steps %d compared %d\n", (int)seed,
               ra.stats.num_preempted_total, (unsigned long long)ra.stats.prefix_cache_hits,
               (unsigned long long)ra.stats.prefix_cache_queries, ra.n_partial_chunks, ra.steps,
               compared);
        assert_true(compared > N / 2);
        if (tight.enable_prefix_caching)
            assert_true(ra.stats.prefix_cache_hits > 0);
        else
            assert_true(ra.stats.prefix_cache_queries == 0);
    }
}

static void test_chunked_prefill(void **state)
{
    rec r[1];
    memset(r, 0, sizeof(r));
    r[0].n_prompt = 23;
    for (int i = 0; i < 23; i++)
        r[0].prompt[i] = 3 + i;
    greedy_params(&r[0].p, 6, true);
    r[0].abort_at = -1;
    engine_config c = config(4, 64, 4, 5);
    run_result res;
    run(&c, r, 1, &res, NULL);
    /* 23 prompt tokens in chunks of 5: 4 chunks without logits, then 3 + sample, then decodes */
    assert_int_equal(res.n_partial_chunks, 4);
    assert_int_equal(res.max_batch_tokens, 5);
    assert_int_equal(res.steps, 5 + 5);
    int32_t want[MAX_OUT];
    fake_backend ref = {.vocab = VOCAB, .favored = -1};
    fake_reference_greedy(&ref, r[0].prompt, 23, 6, EOS, true, want);
    assert_memory_equal(r[0].out, want, 6 * sizeof(int32_t));
    assert_int_equal(res.stats.prompt_tokens_total, 23);
    assert_int_equal(res.stats.generation_tokens_total, 6);
}

static void test_preemption(void **state)
{
    enum { N = 4 };
    rec r[N];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < N; i++) {
        r[i].n_prompt = 10;
        for (int k = 0; k < 10; k++)
            r[i].prompt[k] = 3 + (i * 7 + k * 3) % (VOCAB - 3);
        greedy_params(&r[i].p, 20, true);
        r[i].abort_at = -1;
    }
    /* 29 tokens of KV at most per request = 8 blocks of 4: the cache holds one request */
    engine_config c = config(4, 8, 4, 64);
    run_result res;
    run(&c, r, N, &res, NULL);
    assert_true(res.stats.num_preempted_total > 0);
    for (int i = 0; i < N; i++) {
        int32_t want[MAX_OUT];
        fake_backend ref = {.vocab = VOCAB, .favored = -1};
        fake_reference_greedy(&ref, r[i].prompt, 10, 20, EOS, true, want);
        assert_int_equal(r[i].n_out, 20);
        assert_memory_equal(r[i].out, want, 20 * sizeof(int32_t));
        assert_int_equal(r[i].finish, FINISH_LENGTH);
    }
    /* one block short of the largest request: rejected up front */
    fake_backend *f;
    engine_backend be = fake_backend_create(7, 4, VOCAB, &f);
    model_config mc = fake_model_config(VOCAB, MAX_LEN, EOS);
    engine_config c7 = config(4, 7, 4, 64);
    engine *en;
    loom_err e = {0};
    assert_int_equal(engine_create(&c7, &mc, be, NULL, &en, &e), 0);
    assert_int_equal(engine_add(en, 1, r[0].prompt, 10, &r[0].p, &e), LOOM_ETOOLONG);
    r[0].p.max_tokens = 19;
    assert_int_equal(engine_add(en, 1, r[0].prompt, 10, &r[0].p, &e), 0);
    engine_free(en);
}

static void test_prefix_caching(void **state)
{
    rec r[3];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < 3; i++) {
        r[i].n_prompt = i == 2 ? 16 : 17;
        for (int k = 0; k < r[i].n_prompt; k++)
            r[i].prompt[k] = 3 + k;
        greedy_params(&r[i].p, 5, true);
        r[i].abort_at = -1;
        r[i].arrival = 10 * i; /* one after another */
    }
    engine_config c = config(4, 64, 4, 64);
    run_result res;
    run(&c, r, 3, &res, NULL);
    assert_int_equal(r[0].cached_tokens, 0);
    assert_int_equal(r[1].cached_tokens, 16);
    /* 16 tokens: the last prompt token must be computed, so 12 are reused */
    assert_int_equal(r[2].cached_tokens, 12);
    assert_int_equal(res.stats.prefix_cache_queries, 17 + 17 + 16);
    assert_int_equal(res.stats.prefix_cache_hits, 16 + 12);
    assert_memory_equal(r[0].out, r[1].out, 5 * sizeof(int32_t));
    /* the 16-token prompt is the 17-token prompt minus its last token: other outputs */
    int32_t want[MAX_OUT];
    fake_backend ref = {.vocab = VOCAB, .favored = -1};
    fake_reference_greedy(&ref, r[2].prompt, 16, 5, EOS, true, want);
    assert_memory_equal(r[2].out, want, 5 * sizeof(int32_t));

    /* off: no hits, same tokens */
    rec r2[3];
    memcpy(r2, r, sizeof(r));
    c.enable_prefix_caching = false;
    run(&c, r2, 3, &res, NULL);
    assert_int_equal(r2[1].cached_tokens, 0);
    assert_int_equal(res.stats.prefix_cache_hits, 0);
    for (int i = 0; i < 3; i++)
        assert_memory_equal(r[i].out, r2[i].out, 5 * sizeof(int32_t));
}

static void favor_eos(fake_backend *f)
{
    f->favored = EOS;
    f->favored_bias = 100.0f;
}

static void test_min_tokens_ignore_eos(void **state)
{
    rec r[3];
    memset(r, 0, sizeof(r));
    for (int i = 0; i < 3; i++) {
        r[i].n_prompt = 3;
        r[i].prompt[0] = 10;
        r[i].prompt[1] = 11;
        r[i].prompt[2] = 12;
        greedy_params(&r[i].p, 8, false);
        r[i].abort_at = -1;
    }
    r[1].p.min_tokens = 5;
    r[2].p.ignore_eos = true;
    engine_config c = config(4, 32, 4, 64);
    run_result res;
    run(&c, r, 3, &res, favor_eos);
    /* EOS is by far the most likely token */
    assert_int_equal(r[0].n_out, 1);
    assert_int_equal(r[0].out[0], EOS);
    assert_int_equal(r[0].finish, FINISH_STOP);
    assert_int_equal(r[1].n_out, 6);
    assert_int_equal(r[1].out[5], EOS);
    assert_int_equal(r[1].finish, FINISH_STOP);
    assert_int_equal(r[2].n_out, 8);
    assert_int_equal(r[2].finish, FINISH_LENGTH);
    for (int k = 0; k < 8; k++)
        assert_int_equal(r[2].out[k], EOS);
}

static void test_abort_and_errors(void **state)
{
    fake_backend *f;
    engine_config c = config(4, 32, 4, 64);
    engine_backend be = fake_backend_create(32, 4, VOCAB, &f);
    model_config mc = fake_model_config(VOCAB, MAX_LEN, EOS);
    engine *en;
    loom_err e = {0};
    assert_int_equal(engine_create(&c, &mc, be, NULL, &en, &e), 0);
    sampling_params p;
    greedy_params(&p, 30, true);
    int32_t prompt[20];
    for (int i = 0; i < 20; i++)
        prompt[i] = 3 + i;
    for (uint64_t id = 1; id <= 6; id++)
        assert_int_equal(engine_add(en, id, prompt, 20, &p, &e), 0);
    const engine_event *ev;
    int n_ev;
    double secs;
    assert_int_equal(engine_step(en, &ev, &n_ev, &secs, &e), 0);
    engine_stats st;
    engine_get_stats(en, &st);
    /* budget 64: three 20-token prompts, then the first 4 tokens of the fourth */
    assert_int_equal(st.num_running, 4);
    assert_int_equal(st.num_waiting, 2);
    int free_before = st.num_free_blocks;
    engine_abort(en, 2); /* running: blocks freed now */
    engine_abort(en, 5); /* waiting */
    engine_abort(en, 2); /* twice: one event */
    engine_get_stats(en, &st);
    assert_int_equal(st.num_free_blocks, free_before + 5);
    assert_int_equal(st.num_running, 3);
    assert_int_equal(st.num_waiting, 1);
    engine_check_ok(en);
    assert_int_equal(engine_step(en, &ev, &n_ev, &secs, &e), 0);
    int aborts = 0;
    for (int k = 0; k < n_ev; k++) {
        if (ev[k].finish == FINISH_ABORT) {
            aborts++;
            assert_int_equal(ev[k].token, -1);
            assert_true(ev[k].req_id == 2 || ev[k].req_id == 5);
            assert_int_equal(ev[k].completion_tokens, ev[k].req_id == 2 ? 1 : 0);
        }
    }
    assert_int_equal(aborts, 2);
    engine_check_ok(en);

    /* a backend failure finishes the batch with FINISH_ERROR and frees its blocks */
    f->fail_at = f->n_forward;
    assert_int_equal(engine_step(en, &ev, &n_ev, &secs, &e), 0);
    int errors = 0;
    for (int k = 0; k < n_ev; k++) {
        assert_int_equal(ev[k].finish, FINISH_ERROR);
        errors++;
    }
    engine_get_stats(en, &st);
    assert_int_equal(errors, 4); /* everything that was running, including the admitted ones */
    assert_int_equal(st.num_running, 0);
    assert_int_equal(st.num_waiting, 0);
    assert_int_equal(st.num_free_blocks, 32);
    engine_check_ok(en);
    assert_false(engine_has_work(en));
    engine_free(en);
}

static void test_add_errors(void **state)
{
    fake_backend *f;
    engine_config c = config(4, 8, 4, 64);
    c.max_waiting = 2;
    engine_backend be = fake_backend_create(8, 4, VOCAB, &f);
    model_config mc = fake_model_config(VOCAB, 24, EOS);
    c.max_model_len = 0; /* the model's: 24 */
    engine *en;
    loom_err e = {0};
    assert_int_equal(engine_create(&c, &mc, be, NULL, &en, &e), 0);
    sampling_params p;
    greedy_params(&p, 4, false);
    int32_t prompt[30] = {5, 6, 7};
    assert_int_equal(engine_add(en, 1, prompt, 0, &p, &e), LOOM_EINVAL);
    prompt[1] = VOCAB;
    assert_int_equal(engine_add(en, 1, prompt, 3, &p, &e), LOOM_EINVAL);
    prompt[1] = -1;
    assert_int_equal(engine_add(en, 1, prompt, 3, &p, &e), LOOM_EINVAL);
    prompt[1] = 6;
    p.max_tokens = 0;
    assert_int_equal(engine_add(en, 1, prompt, 3, &p, &e), LOOM_EINVAL);
    p.max_tokens = 4;
    p.min_tokens = 5;
    assert_int_equal(engine_add(en, 1, prompt, 3, &p, &e), LOOM_EINVAL);
    p.min_tokens = 0;
    p.top_p = 0;
    assert_int_equal(engine_add(en, 1, prompt, 3, &p, &e), LOOM_EINVAL);
    p.top_p = 1;
    p.logprobs = 21;
    assert_int_equal(engine_add(en, 1, prompt, 3, &p, &e), LOOM_EINVAL);
    p.logprobs = -1;
    p.max_tokens = 22; /* 3 + 22 > 24 */
    assert_int_equal(engine_add(en, 1, prompt, 3, &p, &e), LOOM_ETOOLONG);
    p.max_tokens = 21;
    assert_int_equal(engine_add(en, 1, prompt, 3, &p, &e), 0);
    assert_int_equal(engine_add(en, 2, prompt, 3, &p, &e), 0);
    assert_int_equal(engine_add(en, 3, prompt, 3, &p, &e), LOOM_EFULL);
    engine_free(en); /* frees queued requests */

    /* bad config: the backend is destroyed with the failed engine */
    be = fake_backend_create(8, 4, VOCAB, &f);
    c.num_kv_blocks = 0;
    assert_int_equal(engine_create(&c, &mc, be, NULL, &en, &e), LOOM_EINVAL);
}

static void test_logprob_events(void **state)
{
    fake_backend *f;
    engine_config c = config(4, 32, 4, 64);
    engine_backend be = fake_backend_create(32, 4, VOCAB, &f);
    model_config mc = fake_model_config(VOCAB, MAX_LEN, EOS);
    engine *en;
    loom_err e = {0};
    assert_int_equal(engine_create(&c, &mc, be, NULL, &en, &e), 0);
    sampling_params p;
    greedy_params(&p, 3, true);
    p.logprobs = 4;
    int32_t prompt[3] = {5, 6, 7};
    assert_int_equal(engine_add(en, 9, prompt, 3, &p, &e), 0);
    int n_tok = 0;
    while (engine_has_work(en)) {
        const engine_event *ev;
        int n_ev;
        double secs;
        assert_int_equal(engine_step(en, &ev, &n_ev, &secs, &e), 0);
        for (int k = 0; k < n_ev; k++) {
            assert_int_equal(ev[k].n_top, 4);
            /* greedy: the chosen token is the top one, and its logprob is the top logprob */
            assert_int_equal(ev[k].top[0].token, ev[k].token);
            assert_true(ev[k].logprob == ev[k].top[0].logprob);
            assert_true(ev[k].logprob <= 0);
            for (int i = 1; i < 4; i++)
                assert_true(ev[k].top[i].logprob <= ev[k].top[i - 1].logprob);
            n_tok++;
        }
    }
    assert_int_equal(n_tok, 3);
    engine_free(en);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_chunked_prefill),  cmocka_unit_test(test_preemption),
        cmocka_unit_test(test_prefix_caching),   cmocka_unit_test(test_min_tokens_ignore_eos),
        cmocka_unit_test(test_abort_and_errors), cmocka_unit_test(test_add_errors),
        cmocka_unit_test(test_logprob_events),   cmocka_unit_test(test_random_workloads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
