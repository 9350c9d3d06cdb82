/* capacity_aware on hand-made snapshots: soonest finish, KV admission and the queue, ties,
 * unhealthy instances, /metrics corrections, capacity estimates that drift, prefix affinity
 * traded against load, and a small offline-batch simulation against round_robin. */
#include "testlib.h"

#include "loom/policy.h"

#include "../src/policy/policy_internal.h"

static policy *make_with(bool prefix_affinity, bool wait_for_soonest)
{
    policy_config cfg;
    policy_config_default(&cfg);
    cfg.prefix_affinity = prefix_affinity;
    cfg.wait_for_soonest = wait_for_soonest;
    policy *p = NULL;
    loom_err e = {0};
    assert_int_equal(policy_create("capacity_aware", &cfg, &p, &e), 0);
    return p;
}

static policy *make(bool prefix_affinity)
{
    return make_with(prefix_affinity, true);
}

static policy_request request(double prompt, double out)
{
    policy_request r;
    memset(&r, 0, sizeof(r));
    r.prompt_tokens = prompt;
    r.expected_output = out;
    return r;
}

static const policy_outcome OK_UNKNOWN = {.ok = true, .prompt_tokens = -1, .completion_tokens = -1};

static void test_picks_soonest_finish(void **state)
{
    (void)state;
    policy *p = make(false);
    policy_instance inst[3];
    /* prefill, decode rates: a fast one with a backlog, a slow idle one, a mid one */
    policy_instance_init(&inst[0], NULL, 1, 10000, 1000, 0);
    policy_instance_init(&inst[1], NULL, 1, 2000, 200, 0);
    policy_instance_init(&inst[2], NULL, 1, 5000, 500, 0);
    policy_request r = request(1000, 100);
    /* idle: T0 = 0.1 + 0.1, T1 = 0.5 + 0.5, T2 = 0.2 + 0.2 -> the fast one */
    assert_int_equal(policy_select(p, inst, 3, &r, 0), 0);
    assert_true(fabs(policy_finish_time(&inst[0], &r, 0) - 0.2) < 1e-12);
    /* give the fast one 600 decode tokens of backlog: T0 = 0.1 + 0.7 = 0.8 > T2 = 0.4 */
    inst[0].pending_decode = 600;
    assert_int_equal(policy_select(p, inst, 3, &r, 0), 2);
    /* and the mid one a prefill backlog too: T2 = (4000+1000)/5000 + 0.2 = 1.2 -> back to 0 */
    inst[2].pending_prefill = 4000;
    assert_int_equal(policy_select(p, inst, 3, &r, 0), 0);
    /* unhealthy instances are never chosen, however fast */
    inst[0].available = false;
    assert_int_equal(policy_select(p, inst, 3, &r, 0), 1); /* T1 = 1.0 < T2 = 1.2 */
    policy_free(p);
}

static void test_dispatch_books_and_complete(void **state)
{
    (void)state;
    policy *p = make(false);
    policy_instance inst[1];
    policy_instance_init(&inst[0], NULL, 1, 1000, 100, 10000);
    policy_request r = request(300, 40);
    policy_ticket t;
    policy_dispatch(p, inst, 1, 0, &r, 1.0, &t);
    assert_true(t.active);
    assert_int_equal(inst[0].outstanding, 1);
    assert_true(inst[0].pending_prefill == 300 && inst[0].pending_decode == 40);
    assert_true(inst[0].kv_reserved == 340 && inst[0].kv_held == 300);
    /* streamed progress: the first token ends the prefill */
    policy_progress(p, inst, &t, 1, 1.2);
    assert_true(inst[0].pending_prefill == 0 && inst[0].pending_decode == 39);
    policy_progress(p, inst, &t, 10, 1.3);
    assert_true(inst[0].pending_decode == 30 && inst[0].kv_held == 310);
    policy_progress(p, inst, &t, 5, 1.3); /* not monotonic: ignored */
    assert_true(inst[0].pending_decode == 30);
    policy_complete(p, inst, &t, &OK_UNKNOWN, 1.5);
    assert_false(t.active);
    assert_int_equal(inst[0].outstanding, 0);
    assert_true(inst[0].pending_prefill == 0 && inst[0].pending_decode == 0);
    assert_true(inst[0].kv_reserved == 0 && inst[0].kv_held == 0);
    assert_int_equal(inst[0].completed, 1);
    policy_complete(p, inst, &t, &OK_UNKNOWN, 1.6); /* idempotent */
    assert_int_equal(inst[0].completed, 1);
    /* a failure is counted and releases the same */
    policy_dispatch(p, inst, 1, 0, &r, 2.0, &t);
    policy_outcome fail = {.ok = false, .prompt_tokens = -1, .completion_tokens = -1};
    policy_complete(p, inst, &t, &fail, 2.1);
    assert_int_equal(inst[0].failed, 1);
    assert_true(inst[0].kv_reserved == 0);
    policy_free(p);
}

static void test_admission_and_queue(void **state)
{
    (void)state;
    /* the literal rule first: the soonest finish among the eligible */
    policy *p = make_with(false, false);
    policy_instance inst[2];
    /* KV capacities 1000 and 2000 tokens; θ = 0.95 */
    policy_instance_init(&inst[0], NULL, 1, 10000, 1000, 1000);
    policy_instance_init(&inst[1], NULL, 1, 2000, 200, 2000);
    policy_request r = request(400, 100); /* needs 500 */
    policy_ticket t[8];
    int n0 = 0, n1 = 0, k = 0;
    for (;; k++) {
        int i = policy_select(p, inst, 2, &r, 0);
        if (i == POLICY_QUEUE)
            break;
        assert_true(i >= 0);
        policy_dispatch(p, inst, 2, i, &r, 0, &t[k]);
        i == 0 ? n0++ : n1++;
        assert_true(k < 8);
    }
    /* inst0: 1 request idle-admitted (500 <= 950), a second would reach 1000 > 950.
     * inst1: 3 requests (1500 <= 1900), a fourth would be 2000 > 1900. */
    assert_int_equal(n0, 1);
    assert_int_equal(n1, 3);
    for (int i = 0; i < 2; i++)
        assert_false(policy_admits(p, &inst[i], &r, 0));
    /* a completion frees room: the request goes there */
    int freed = t[0].instance;
    policy_complete(p, inst, &t[0], &OK_UNKNOWN, 1);
    assert_int_equal(policy_select(p, inst, 2, &r, 1), freed);
    /* an idle instance admits even a request larger than its headroom */
    policy_instance big[1];
    policy_instance_init(&big[0], NULL, 1, 1000, 100, 100);
    policy_request huge = request(5000, 100);
    assert_true(policy_admits(p, &big[0], &huge, 0));
    assert_int_equal(policy_select(p, big, 1, &huge, 0), 0);
    /* queue versus unavailable */
    inst[0].available = inst[1].available = false;
    assert_int_equal(policy_select(p, inst, 2, &r, 1), POLICY_UNAVAILABLE);
    policy_free(p);

    /* the default waits for the soonest finish: once the fast instance is full, the next
     * request (T0 = 0.08 + 0.2 < T1 = 0.2 + 0.5) waits for it rather than take the slow one */
    p = make(false);
    policy_instance_init(&inst[0], NULL, 1, 10000, 1000, 1000);
    policy_instance_init(&inst[1], NULL, 1, 2000, 200, 2000);
    assert_int_equal(policy_select(p, inst, 2, &r, 0), 0);
    policy_dispatch(p, inst, 2, 0, &r, 0, &t[0]);
    assert_false(policy_admits(p, &inst[0], &r, 0));
    assert_true(policy_admits(p, &inst[1], &r, 0));
    assert_int_equal(policy_select(p, inst, 2, &r, 0), POLICY_QUEUE);
    /* ... until the fast one's backlog outweighs the slow one's whole time */
    inst[0].pending_decode += 1000;
    assert_int_equal(policy_select(p, inst, 2, &r, 0), 1);
    policy_free(p);
}

/*
 * Known max batches: a full instance takes no more (the caller holds the request); the time
 * until it frees a slot is the smallest remaining work of what it runs (streamed progress
 * counts); a slower instance with a free slot takes the request when it finishes it before the
 * cluster could drain the work that waits, and leaves it to the faster one otherwise.
 */
static void test_hold_beyond_batch_and_drain(void **state)
{
    (void)state;
    policy *p = make(false);
    policy_instance inst[2];
    /* fast: 10000 prompt / 800 decode tokens/s at its batch of 2; slow: 2500 / 200 */
    policy_instance_init(&inst[0], NULL, 1, 10000, 800, 0);
    policy_instance_init(&inst[1], NULL, 1, 2500, 200, 0);
    inst[0].max_batch = inst[1].max_batch = 2;
    policy_request a = request(0, 100), b = request(0, 300), r = request(0, 100);
    policy_ticket t[4];
    policy_set_backlog(p, 0, 100);
    assert_int_equal(policy_select(p, inst, 2, &a, 0), 0);
    policy_dispatch(p, inst, 2, 0, &a, 0, &t[0]);
    assert_int_equal(policy_select(p, inst, 2, &b, 0), 0); /* 2nd slot: 300 x 2/800 + ... */
    policy_dispatch(p, inst, 2, 0, &b, 0, &t[1]);
    /* full: slot wait min(100, 300) x 2/800 = 0.25 s, then 100 x 2/800 = 0.25 s: 0.5 s; the
     * wave bound, one wave of the mean outstanding request (2 x 200/800 = 0.5 s) and r alone
     * (100 x 2/800 x 0.75 = 0.1875 s), is larger: 0.6875 s. The slow one alone:
     * 100 x 2/200 x (0.5 + 0.5 x 1/2) = 0.75 s. With nothing else waiting (drain
     * (400 + 100) / 1000 = 0.5 s < 0.75 s) the request waits for the fast one. */
    assert_true(fabs(policy_finish_time(&inst[1], &r, 0) - 0.75) < 1e-12);
    assert_int_equal(policy_select(p, inst, 2, &r, 0), POLICY_QUEUE);
    /* 500 more decode tokens held behind it: the cluster needs (400 + 600) / 1000 = 1 s, the
     * slow slot finishes r at 0.75 s: it takes it */
    policy_set_backlog(p, 0, 600);
    assert_int_equal(policy_select(p, inst, 2, &r, 0), 1);
    /* without holding, the full fast instance is a candidate like any other */
    policy_config cfg;
    policy_config_default(&cfg);
    cfg.hold_beyond_batch = false;
    policy *q = NULL;
    loom_err e = {0};
    assert_int_equal(policy_create("capacity_aware", &cfg, &q, &e), 0);
    policy_set_backlog(q, 0, 100);
    assert_int_equal(policy_select(q, inst, 2, &r, 0), 0); /* 0.6875 s < 0.75 s */
    policy_free(q);
    /* its first slot frees when a's 100 tokens are done: 100 x 2/800 = 0.25 s; the second
     * when b's are: 0.75 s. Once a has streamed 90 tokens, in 10 x 2/800 = 0.025 s */
    assert_true(fabs(policy_slot_wait(p, 0, 1, 2, 10000, 800) - 0.25) < 1e-12);
    assert_true(fabs(policy_slot_wait(p, 0, 2, 2, 10000, 800) - 0.75) < 1e-12);
    assert_true(policy_slot_wait(p, 0, 3, 2, 10000, 800) == 0); /* only 2 outstanding */
    policy_progress(p, inst, &t[0], 90, 0.2);
    assert_true(fabs(policy_slot_wait(p, 0, 1, 2, 10000, 800) - 0.025) < 1e-12);
    policy_set_backlog(p, 0, 100);
    assert_int_equal(policy_select(p, inst, 2, &r, 0.2), POLICY_QUEUE);
    /* a completion frees the slot: the request goes to the fast instance now */
    policy_complete(p, inst, &t[0], &OK_UNKNOWN, 0.3);
    assert_true(fabs(policy_slot_wait(p, 0, 1, 2, 10000, 800) - 0.75) < 1e-12); /* b's alone */
    assert_int_equal(policy_select(p, inst, 2, &r, 0.3), 0);
    policy_complete(p, inst, &t[1], &OK_UNKNOWN, 0.4);
    policy_free(p);
}

static void test_all_ineligible_with_unknown_capacity_uses_metrics(void **state)
{
    (void)state;
    policy *p = make(false);
    policy_instance inst[2];
    policy_instance_init(&inst[0], NULL, 1, 1000, 100, 0); /* KV size unknown */
    policy_instance_init(&inst[1], NULL, 1, 1000, 100, 0);
    policy_request r = request(100, 10);
    policy_ticket t[2];
    policy_dispatch(p, inst, 2, 0, &r, 0, &t[0]);
    policy_dispatch(p, inst, 2, 1, &r, 0, &t[1]);
    /* without capacity or metrics, everything is admitted */
    assert_true(policy_select(p, inst, 2, &r, 0) >= 0);
    /* both report 97% KV use: nobody admits, the request queues */
    policy_metrics m = {
        .num_running = 8, .num_waiting = 3, .kv_usage = 0.97, .kv_capacity_tokens = -1};
    policy_observe_metrics(p, &inst[0], &m, 1);
    policy_observe_metrics(p, &inst[1], &m, 1);
    assert_int_equal(policy_select(p, inst, 2, &r, 1), POLICY_QUEUE);
    /* metrics go stale after metrics_max_age_s: admitted again */
    assert_true(policy_select(p, inst, 2, &r, 1 + 6) >= 0);
    policy_free(p);
}

static void test_metrics_correct_kv_estimate(void **state)
{
    (void)state;
    policy *p = make(false);
    policy_instance inst[2];
    policy_instance_init(&inst[0], NULL, 1, 1000, 100, 0);
    policy_instance_init(&inst[1], NULL, 1, 1000, 100, 0);
    policy_request r = request(200, 100);
    policy_ticket t;
    policy_dispatch(p, inst, 2, 0, &r, 0, &t); /* inst0 holds 200, reserves 300 */
    /* inst0 says: 10000-token cache (625 blocks of 16), 95% used -> 9300 beyond our estimate */
    policy_metrics m = {
        .num_running = 5, .num_waiting = 0, .kv_usage = 0.95, .kv_capacity_tokens = 10000};
    policy_observe_metrics(p, &inst[0], &m, 1);
    assert_true(inst[0].kv_capacity == 10000);
    assert_true(fabs(inst[0].kv_external - 9300) < 1e-9);
    assert_true(fabs(policy_kv_used(p, &inst[0], 1) - 9600) < 1e-9);
    /* 9600 + 300 > 9500: inst0 no longer admits although our own books say it is nearly idle */
    assert_false(policy_admits(p, &inst[0], &r, 1));
    assert_int_equal(policy_select(p, inst, 2, &r, 1), 1);
    /* a later scrape that explains everything removes the correction */
    m.kv_usage = 0.01;
    policy_observe_metrics(p, &inst[0], &m, 2);
    assert_true(inst[0].kv_external == 0);
    assert_true(policy_admits(p, &inst[0], &r, 2));
    policy_free(p);
}

static void test_ties_rotate(void **state)
{
    (void)state;
    policy *p = make(false);
    policy_instance inst[3];
    for (int i = 0; i < 3; i++)
        policy_instance_init(&inst[i], NULL, 1, 1000, 100, 0);
    policy_request r = request(100, 10);
    /* identical idle instances: select alone is stable ... */
    int first = policy_select(p, inst, 3, &r, 0);
    assert_int_equal(policy_select(p, inst, 3, &r, 0), first);
    /* ... and a dispatch-complete cycle moves on to the next one */
    int seen[3] = {0};
    for (int k = 0; k < 9; k++) {
        policy_ticket t;
        int i = policy_select(p, inst, 3, &r, k);
        policy_dispatch(p, inst, 3, i, &r, k, &t);
        policy_complete(p, inst, &t, &OK_UNKNOWN, k + 0.5);
        seen[i]++;
    }
    assert_int_equal(seen[0], 3);
    assert_int_equal(seen[1], 3);
    assert_int_equal(seen[2], 3);
    policy_free(p);
}

/*
 * Drift: the plan says instance 0 decodes at 1000 tokens/s, but it really runs at 250 (a noisy
 * neighbour). Requests served one at a time, each taking its true time; the busy-window EMA
 * must bring the estimate to the truth, and the choice must follow.
 */
static void test_capacity_estimate_drifts_to_truth(void **state)
{
    (void)state;
    policy *p = make(false);
    policy_instance inst[2];
    policy_instance_init(&inst[0], NULL, 1, 1e9, 1000, 0);
    policy_instance_init(&inst[1], NULL, 1, 1e9, 500, 0);
    policy_request r = request(1, 100);
    assert_int_equal(policy_select(p, inst, 2, &r, 0), 0); /* believed fastest */
    double now = 0;
    for (int k = 0; k < 60; k++) {
        policy_ticket t;
        policy_dispatch(p, inst, 2, 0, &r, now, &t);
        now += 100.0 / 250.0; /* the truth */
        policy_outcome o = {.ok = true, .prompt_tokens = 1, .completion_tokens = 100};
        policy_complete(p, inst, &t, &o, now);
        now += 0.01; /* idle gap: not busy time */
    }
    assert_true(inst[0].rate_updates >= 20);
    assert_true(fabs(inst[0].decode_rate - 250) / 250 < 0.05);
    /* the prefill rate saw no prefill-heavy window: essentially untouched */
    assert_true(inst[0].prefill_rate > 0.5e9);
    assert_int_equal(policy_select(p, inst, 2, &r, now), 1);
    /* and back up when it recovers (to 2000 tokens/s) */
    for (int k = 0; k < 300; k++) {
        policy_ticket t;
        policy_dispatch(p, inst, 2, 0, &r, now, &t);
        now += 100.0 / 2000.0;
        policy_outcome o = {.ok = true, .prompt_tokens = 1, .completion_tokens = 100};
        policy_complete(p, inst, &t, &o, now);
    }
    assert_true(fabs(inst[0].decode_rate - 2000) / 2000 < 0.1);
    assert_int_equal(policy_select(p, inst, 2, &r, now), 0);
    /* failures never feed the rates */
    double before = inst[0].decode_rate;
    for (int k = 0; k < 20; k++) {
        policy_ticket t;
        policy_dispatch(p, inst, 2, 0, &r, now, &t);
        now += 1.0;
        policy_outcome f = {.ok = false, .prompt_tokens = -1, .completion_tokens = -1};
        policy_complete(p, inst, &t, &f, now);
    }
    assert_true(inst[0].decode_rate == before);
    policy_free(p);
}

/* Concurrent requests: the window's rate is the aggregate one, not per request. */
static void test_rate_estimate_counts_concurrency(void **state)
{
    (void)state;
    policy *p = make(false);
    policy_instance inst[1];
    policy_instance_init(&inst[0], NULL, 1, 1e9, 100, 0);
    policy_request r = request(1, 100);
    double now = 0;
    for (int round = 0; round < 40; round++) {
        policy_ticket t[8];
        for (int k = 0; k < 8; k++)
            policy_dispatch(p, inst, 1, 0, &r, now, &t[k]);
        now += 1.0; /* 8 x 100 tokens in one busy second: 800 tokens/s together */
        policy_outcome o = {.ok = true, .prompt_tokens = 1, .completion_tokens = 100};
        for (int k = 0; k < 8; k++)
            policy_complete(p, inst, &t[k], &o, now);
    }
    assert_true(fabs(inst[0].decode_rate - 800) / 800 < 0.05);
    policy_free(p);
}

static void fill_prefix(uint64_t *h, int n, uint64_t base)
{
    for (int i = 0; i < n; i++)
        h[i] = base + (uint64_t)i * 7919 + 1;
}

static void test_prefix_affinity_traded_against_load(void **state)
{
    (void)state;
    policy *p = make(true);
    policy_instance inst[2];
    policy_instance_init(&inst[0], NULL, 1, 1000, 100, 0);
    policy_instance_init(&inst[1], NULL, 1, 1000, 100, 0);
    uint64_t shared[64];
    fill_prefix(shared, 64, 1000);
    /* 64 blocks of 16 tokens = 1024 of a 1100-token prompt */
    policy_request r = request(1100, 20);
    r.prefix = shared;
    r.n_prefix = 64;
    r.prefix_block_tokens = 16;
    assert_true(policy_prefix_credit(p, 0, &r) == 0);
    /* the first request goes to instance 0 (tie, first in the scan) and indexes the prefix */
    policy_ticket t0;
    assert_int_equal(policy_select(p, inst, 2, &r, 0), 0);
    policy_dispatch(p, inst, 2, 0, &r, 0, &t0);
    assert_true(policy_prefix_credit(p, 0, &r) == 1024);
    assert_true(policy_prefix_credit(p, 1, &r) == 0);
    policy_complete(p, inst, &t0, &OK_UNKNOWN, 2);
    /* both idle again: affinity wins (T0 = 0.076 + 0.2 vs T1 = 1.1 + 0.2) although the
     * scan now starts at instance 1 */
    assert_int_equal(policy_select(p, inst, 2, &r, 2), 0);
    /* a partial match counts the matching leading blocks only */
    uint64_t half[64];
    memcpy(half, shared, sizeof(half));
    half[32] ^= 0xdead; /* the chain breaks at block 32 */
    policy_request r2 = r;
    r2.prefix = half;
    assert_true(policy_prefix_credit(p, 0, &r2) == 32 * 16);
    /* load beats affinity: 2 s of decode backlog on instance 0 outweighs 1.024 s of prefill */
    inst[0].pending_decode = 200;
    assert_int_equal(policy_select(p, inst, 2, &r, 2), 1);
    /* a modest backlog does not: 0.5 s < 1.024 s saved */
    inst[0].pending_decode = 50;
    assert_int_equal(policy_select(p, inst, 2, &r, 2), 0);
    /* a burst of identical-prefix requests spreads once the backlog grows */
    inst[0].pending_decode = 0;
    int count[2] = {0};
    policy_ticket t[40];
    for (int k = 0; k < 40; k++) {
        int i = policy_select(p, inst, 2, &r, 3);
        policy_dispatch(p, inst, 2, i, &r, 3, &t[k]);
        count[i]++;
    }
    assert_true(count[1] > 5);        /* not everything piled onto the cached instance */
    assert_true(count[0] > count[1]); /* but the cache still pulls */
    /* an instance that restarted has lost its cache */
    policy_reset_instance(p, 0);
    assert_true(policy_prefix_credit(p, 0, &r) == 0);
    /* credit never exceeds the prompt */
    policy_request shortp = r;
    shortp.prompt_tokens = 100;
    assert_true(policy_prefix_credit(p, 1, &shortp) <= 100);
    policy_free(p);
}

static void test_prefix_off_gives_no_credit(void **state)
{
    (void)state;
    policy *p = make(false);
    policy_instance inst[1];
    policy_instance_init(&inst[0], NULL, 1, 1000, 100, 0);
    uint64_t h[4];
    fill_prefix(h, 4, 5);
    policy_request r = request(100, 10);
    r.prefix = h;
    r.n_prefix = 4;
    r.prefix_block_tokens = 16;
    policy_ticket t;
    policy_dispatch(p, inst, 1, 0, &r, 0, &t);
    assert_true(policy_prefix_credit(p, 0, &r) == 0);
    assert_true(t.credit == 0);
    policy_free(p);
}

/*
 * An offline batch on two instances whose decode rates differ 3.45x (the paper's first cluster,
 * reconstructed): a tiny fluid simulation where each instance decodes its outstanding requests
 * at its aggregate rate, shared evenly. capacity_aware must finish the batch at least 2x sooner
 * than round_robin (the ideal is (1 + 3.45) / 2 = 2.22x). Returns the duration of the last of
 * `batches` batches (each released when the previous one is done) and the decode rates believed
 * at the end.
 */
static double simulate_batches(const char *name, bool rates_known, int batches, double *est)
{
    policy_config cfg;
    policy_config_default(&cfg);
    policy *p = NULL;
    loom_err e = {0};
    assert_int_equal(policy_create(name, &cfg, &p, &e), 0);
    const double true_rate[2] = {3450, 1000};
    policy_instance inst[2];
    /* known: the plan's rates; unknown: equal priors the online estimate must correct */
    policy_instance_init(&inst[0], &cfg, 1, 1e9, rates_known ? true_rate[0] : 2000, 40000);
    policy_instance_init(&inst[1], &cfg, 1, 1e9, rates_known ? true_rate[1] : 2000, 40000);
    enum { NREQ = 400 };
    static policy_ticket t[NREQ];
    static double left[NREQ];
    static policy_request r[NREQ];
    loom_rng rng;
    rng_seed(&rng, 42);
    double now = 0, dt = 0.01, duration = 0;
    for (int b = 0; b < batches; b++) {
        for (int k = 0; k < NREQ; k++) {
            r[k] = request(1, 50 + (double)(rng_next(&rng) % 400));
            left[k] = r[k].expected_output;
            t[k].active = false;
        }
        int next = 0, done = 0;
        double start = now;
        while (done < NREQ && now - start < 1000) {
            while (next < NREQ) { /* dispatch what the policy admits */
                int i = policy_select(p, inst, 2, &r[next], now);
                if (i < 0)
                    break;
                policy_dispatch(p, inst, 2, i, &r[next], now, &t[next]);
                next++;
            }
            for (int s = 0; s < 2; s++) {
                int64_t busy = inst[s].outstanding;
                if (busy == 0)
                    continue;
                double each = true_rate[s] * dt / (double)busy;
                for (int k = 0; k < next; k++) {
                    if (!t[k].active || t[k].instance != s)
                        continue;
                    left[k] -= each;
                    if (left[k] <= 0) {
                        policy_outcome o = {.ok = true,
                                            .prompt_tokens = 1,
                                            .completion_tokens = r[k].expected_output};
                        policy_complete(p, inst, &t[k], &o, now + dt);
                        done++;
                    }
                }
            }
            now += dt;
        }
        assert_int_equal(done, NREQ);
        duration = now - start;
    }
    if (est) {
        est[0] = inst[0].decode_rate;
        est[1] = inst[1].decode_rate;
    }
    policy_free(p);
    return duration;
}

static void test_offline_batch_beats_round_robin(void **state)
{
    (void)state;
    double rr = simulate_batches("round_robin", true, 1, NULL);
    double lr = simulate_batches("least_requests", true, 1, NULL);
    double ca = simulate_batches("capacity_aware", true, 1, NULL);
    printf("offline batch: round_robin %.2f s, least_requests %.2f s, capacity_aware %.2f s "
           "(gain %.2fx)\n",
           rr, lr, ca, rr / ca);
    assert_true(rr / ca >= 2.0);
}

/* Without the plan's rates (equal priors) the first batch is committed half and half before
 * anything is learnt; the rates learnt while serving it make the second batch as good as
 * knowing them. */
static void test_offline_batch_rates_learnt_online(void **state)
{
    (void)state;
    double est[2];
    double rr = simulate_batches("round_robin", true, 1, NULL);
    double first = simulate_batches("capacity_aware", false, 1, NULL);
    double second = simulate_batches("capacity_aware", false, 2, est);
    printf("equal priors: first batch %.2f s (gain %.2fx), second %.2f s (gain %.2fx); "
           "learnt decode rates %.0f and %.0f (true 3450 and 1000)\n",
           first, rr / first, second, rr / second, est[0], est[1]);
    assert_true(fabs(est[0] - 3450) / 3450 < 0.15);
    assert_true(fabs(est[1] - 1000) / 1000 < 0.15);
    assert_true(rr / second >= 2.0);
}

/*
 * A step-level simulation for the wave-aware estimate: each instance runs at most max_batch
 * sequences, admits waiting requests in order as slots free, and runs one step at a time: the
 * prompts of the requests it admitted (each yields its first token) at its prefill rate, plus
 * one decode step for the others lasting step_full x (fixed + (1 - fixed) x m / max_batch) with
 * m sequences decoding, so a sequence decodes faster when few run. The gateway holds requests in
 * order and dispatches whatever the policy lets it. Deterministic: no clock but the simulated one.
 */
typedef struct step_instance {
    double prefill_rate; /* true prompt tokens/s */
    double decode_rate;  /* true output tokens/s at max_batch sequences */
    double fixed;        /* true share of a full-batch decode step that does not shrink */
    int max_batch;
    double weight; /* weighted_round_robin's share (the plan's output tokens/s) */
} step_instance;

enum { SIM_MAX_REQ = 256, SIM_MAX_INST = 4 };

typedef struct step_sim {
    int n_inst, n_req;
    const step_instance *truth;
    double prompt[SIM_MAX_REQ], output[SIM_MAX_REQ];
} step_sim;

/* Mean makespan (seconds) over `rounds` offline batches of sim's requests, each released when
 * the previous one is done. wave: tell capacity_aware the instances' max_batch. per[]: requests
 * each instance got in the last round. */
static double simulate_steps(const char *name, const step_sim *sim, bool wave, int rounds, int *per)
{
    policy_config cfg;
    policy_config_default(&cfg);
    policy *p = NULL;
    loom_err e = {0};
    assert_int_equal(policy_create(name, &cfg, &p, &e), 0);
    int ni = sim->n_inst, nr = sim->n_req;
    policy_instance inst[SIM_MAX_INST];
    for (int s = 0; s < ni; s++) {
        const step_instance *t = &sim->truth[s];
        policy_instance_init(&inst[s], &cfg, t->weight, t->prefill_rate, t->decode_rate, 0);
        inst[s].max_batch = wave ? t->max_batch : 0;
    }
    static policy_request r[SIM_MAX_REQ];
    static policy_ticket tk[SIM_MAX_REQ];
    static int produced[SIM_MAX_REQ], queue[SIM_MAX_INST][SIM_MAX_REQ];
    static bool running[SIM_MAX_REQ];
    int qhead[SIM_MAX_INST], qtail[SIM_MAX_INST], nrun[SIM_MAX_INST];
    int step_members[SIM_MAX_INST][SIM_MAX_REQ], n_members[SIM_MAX_INST];
    double step_end[SIM_MAX_INST];
    double now = 0, total = 0;
    for (int round = 0; round < rounds; round++) {
        for (int k = 0; k < nr; k++) {
            r[k] = request(sim->prompt[k], sim->output[k]);
            produced[k] = 0;
            running[k] = false;
        }
        for (int s = 0; s < ni; s++) {
            qhead[s] = qtail[s] = nrun[s] = n_members[s] = 0;
            step_end[s] = INFINITY;
            if (per)
                per[s] = 0;
        }
        int next = 0, done = 0;
        double start = now;
        while (done < nr) {
            while (next < nr) { /* the gateway: in order, while the policy lets it */
                double bp = 0, bd = 0; /* what it holds, r[next] included */
                for (int k = next; k < nr; k++) {
                    bp += r[k].prompt_tokens;
                    bd += r[k].expected_output;
                }
                policy_set_backlog(p, bp, bd);
                int i = policy_select(p, inst, ni, &r[next], now);
                if (i < 0)
                    break;
                policy_dispatch(p, inst, ni, i, &r[next], now, &tk[next]);
                queue[i][qtail[i]++] = next;
                if (per)
                    per[i]++;
                next++;
            }
            for (int s = 0; s < ni; s++) { /* idle instances with work start a step */
                if (step_end[s] < INFINITY)
                    continue;
                const step_instance *t = &sim->truth[s];
                double prefill = 0;
                n_members[s] = 0;
                int decoding = 0;
                for (int k = 0; k < next; k++)
                    if (running[k] && tk[k].instance == s) {
                        step_members[s][n_members[s]++] = k;
                        decoding++;
                    }
                while (nrun[s] < t->max_batch && qhead[s] < qtail[s]) {
                    int k = queue[s][qhead[s]++];
                    running[k] = true;
                    nrun[s]++;
                    prefill += r[k].prompt_tokens;
                    step_members[s][n_members[s]++] = k;
                }
                if (n_members[s] == 0)
                    continue;
                double full = t->max_batch / t->decode_rate;
                double m = decoding;
                step_end[s] =
                    now + prefill / t->prefill_rate +
                    (decoding ? full * (t->fixed + (1 - t->fixed) * m / t->max_batch) : 0);
            }
            int s = 0; /* the next step to end */
            for (int j = 1; j < ni; j++)
                if (step_end[j] < step_end[s])
                    s = j;
            assert_true(step_end[s] < INFINITY);
            now = step_end[s];
            step_end[s] = INFINITY;
            for (int x = 0; x < n_members[s]; x++) {
                int k = step_members[s][x];
                policy_progress(p, inst, &tk[k], ++produced[k], now); /* as a stream reports */
                if (produced[k] < (int)r[k].expected_output)
                    continue;
                running[k] = false;
                nrun[s]--;
                policy_outcome o = {.ok = true,
                                    .prompt_tokens = r[k].prompt_tokens,
                                    .completion_tokens = produced[k]};
                policy_complete(p, inst, &tk[k], &o, now);
                done++;
            }
        }
        total += now - start;
    }
    policy_free(p);
    return total / rounds;
}

/* The 4-instance CPU cluster of docs/heterogeneous.md (8, 4, 2 and 1 threads of a 125M model,
 * --max-num-seqs 8): the plan's prefill and decode rates at a batch of 8, and its output
 * tokens/s as weighted_round_robin's weights. */
static void cpu_cluster(step_instance *t, double fixed)
{
    const double prefill[4] = {1594, 1181, 919, 486}, decode[4] = {498, 296, 204, 116};
    const double output[4] = {415.5, 256.1, 179.5, 101.3};
    for (int s = 0; s < 4; s++) {
        t[s] = (step_instance){.prefill_rate = prefill[s],
                               .decode_rate = decode[s],
                               .fixed = fixed,
                               .max_batch = 8,
                               .weight = output[s] / output[3]};
    }
}

static void fill_lengths(step_sim *sim, int n, uint64_t seed, double p_lo, double p_hi, double o_lo,
                         double o_hi)
{
    loom_rng rng;
    rng_seed(&rng, seed);
    sim->n_req = n;
    for (int k = 0; k < n; k++) {
        sim->prompt[k] = p_lo + (double)(rng_next(&rng) % (uint64_t)(p_hi - p_lo + 1));
        sim->output[k] = o_lo + (double)(rng_next(&rng) % (uint64_t)(o_hi - o_lo + 1));
    }
}

typedef struct sim_result {
    double rr, wrr, old, wave;
    int per_old[SIM_MAX_INST], per_wave[SIM_MAX_INST], per_wrr[SIM_MAX_INST];
} sim_result;

static sim_result compare(const char *label, const step_sim *sim, int rounds)
{
    sim_result x;
    x.rr = simulate_steps("round_robin", sim, false, rounds, NULL);
    x.wrr = simulate_steps("weighted_round_robin", sim, false, rounds, x.per_wrr);
    x.old = simulate_steps("capacity_aware", sim, false, rounds, x.per_old);
    x.wave = simulate_steps("capacity_aware", sim, true, rounds, x.per_wave);
    printf("%s: makespan round_robin %.2f s, weighted_round_robin %.2f s (%.2fx), "
           "capacity_aware aggregate %.2f s (%.2fx), wave-aware %.2f s (%.2fx)\n",
           label, x.rr, x.wrr, x.rr / x.wrr, x.old, x.rr / x.old, x.wave, x.rr / x.wave);
    printf("    requests per instance, last round: wrr");
    for (int s = 0; s < sim->n_inst; s++)
        printf(" %d", x.per_wrr[s]);
    printf(", aggregate");
    for (int s = 0; s < sim->n_inst; s++)
        printf(" %d", x.per_old[s]);
    printf(", wave-aware");
    for (int s = 0; s < sim->n_inst; s++)
        printf(" %d", x.per_wave[s]);
    printf("\n");
    return x;
}

/*
 * The preliminary CPU run of docs/heterogeneous.md: 64 requests (prompts ~55, 64 output tokens
 * each) on 8/4/2/1-thread instances of max batch 8. The aggregate estimate gives the 1-thread
 * instance a ninth request, which runs alone in a second wave; the wave-aware one must finish
 * the batch sooner, and no later than weighted_round_robin, whatever the true fixed share of a
 * decode step (from nearly compute-bound to mostly fixed).
 */
static void test_offline_batch_waves(void **state)
{
    (void)state;
    static step_instance truth[4];
    static step_sim sim;
    sim.n_inst = 4;
    sim.truth = truth;
    fill_lengths(&sim, 64, 7, 40, 70, 64, 64);
    const double fixed[] = {0.25, 0.5, 0.75};
    for (size_t v = 0; v < sizeof(fixed) / sizeof(fixed[0]); v++) {
        cpu_cluster(truth, fixed[v]);
        char label[96];
        snprintf(label, sizeof(label), "CPU 8/4/2/1, 64 x 64 tokens, fixed step share %.2f",
                 fixed[v]);
        compare(label, &sim, 1);                /* the plan's rates only: for the record */
        sim_result x = compare(label, &sim, 3); /* with the rates refined between rounds */
        assert_true(x.wave < x.old);
        /* The estimate assumes a fixed share of 0.5; a nearly compute-bound instance (0.25)
         * runs short waves faster than it expects, and weighted_round_robin's static split
         * happens to fit that better (by 6% here). */
        assert_true(x.wave <= x.wrr * (fixed[v] >= 0.5 ? 1.0001 : 1.07));
    }
    /* varied lengths (the final run's 128 requests, outputs up to 128) */
    fill_lengths(&sim, 128, 11, 10, 120, 8, 128);
    cpu_cluster(truth, 0.5);
    sim_result x = compare("CPU 8/4/2/1, 128 varied, fixed step share 0.50", &sim, 3);
    assert_true(x.wave <= x.old * 1.0001);
}

/* The emulated pair of docs/heterogeneous.md (H100-80G and V100-32G, 13B model, max batch 8,
 * 48 requests of the conversation trace's sizes): mostly memory-bound decode; the wave-aware
 * estimate must not make it worse. */
static void test_offline_batch_waves_gpu_pair(void **state)
{
    (void)state;
    static step_instance truth[2];
    static step_sim sim;
    truth[0] = (step_instance){.prefill_rate = 21299,
                               .decode_rate = 683.9,
                               .fixed = 0.85,
                               .max_batch = 8,
                               .weight = 579.8 / 143.7};
    truth[1] = (step_instance){
        .prefill_rate = 2994, .decode_rate = 201.7, .fixed = 0.85, .max_batch = 8, .weight = 1};
    sim.n_inst = 2;
    sim.truth = truth;
    fill_lengths(&sim, 48, 5, 100, 2200, 20, 400);
    sim_result x = compare("H100 + V100 (emulated), 48 requests", &sim, 3);
    assert_true(x.wave <= x.old * 1.02);
    /* issue 5's target for such a pair, which the live run (bench/hetero.sh) also meets */
    assert_true(x.rr / x.wave >= 2.0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_picks_soonest_finish),
        cmocka_unit_test(test_dispatch_books_and_complete),
        cmocka_unit_test(test_admission_and_queue),
        cmocka_unit_test(test_hold_beyond_batch_and_drain),
        cmocka_unit_test(test_all_ineligible_with_unknown_capacity_uses_metrics),
        cmocka_unit_test(test_metrics_correct_kv_estimate),
        cmocka_unit_test(test_ties_rotate),
        cmocka_unit_test(test_capacity_estimate_drifts_to_truth),
        cmocka_unit_test(test_rate_estimate_counts_concurrency),
        cmocka_unit_test(test_prefix_affinity_traded_against_load),
        cmocka_unit_test(test_prefix_off_gives_no_credit),
        cmocka_unit_test(test_offline_batch_beats_round_robin),
        cmocka_unit_test(test_offline_batch_rates_learnt_online),
        cmocka_unit_test(test_offline_batch_waves),
        cmocka_unit_test(test_offline_batch_waves_gpu_pair),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
