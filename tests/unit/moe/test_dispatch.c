/*
 * Dispatch/combine, capacity and drops, send counts and communication statistics: property
 * tests on random routings (acceptance 2) and hand-computed small cases.
 */
#include "testlib.h"

#include "loom/base.h"
#include "loom/moe.h"

static int rand_int(loom_rng *r, int lo, int hi) /* [lo, hi] */
{
    return lo + (int)(rng_next(r) % (uint64_t)(hi - lo + 1));
}

/* Random routing from a real router: topk / group-limited / expert choice / hash / locmoe on
 * random inputs, with a random share of slots emptied (-1) as a caller may do. */
static void random_routing(loom_rng *rng, int T, int E, int k, int kind, int32_t *idx, float *w,
                           int *k_out)
{
    loom_err e;
    moe_router_config c;
    int d = E + rand_int(rng, 0, 8);
    moe_router_config_default(&c, (moe_router_kind)kind, d, E);
    c.k = k;
    c.seed = rng_next(rng);
    if (kind == MOE_ROUTER_GROUP_LIMITED) {
        c.n_groups = E % 2 == 0 ? 2 : 1;
        c.topk_groups = c.n_groups;
        c.renormalize = true;
    }
    if (kind == MOE_ROUTER_TOPK)
        c.renormalize = rand_int(rng, 0, 1);
    if (kind == MOE_ROUTER_HASH)
        c.vocab_size = 50;
    moe_router r;
    moe_routing rt;
    assert_int_equal(moe_router_init(&r, &c, &e), 0);
    assert_int_equal(moe_routing_init(&rt, &r.cfg, T, &e), 0);
    float *x = malloc(sizeof(float) * T * d);
    int32_t *tok = malloc(sizeof(int32_t) * T);
    for (int i = 0; i < T * d; i++)
        x[i] = rng_normal(rng);
    for (int t = 0; t < T; t++)
        tok[t] = rand_int(rng, 0, 99);
    assert_int_equal(moe_router_forward(&r, x, tok, T, false, &rt, &e), 0);
    *k_out = rt.k;
    memcpy(idx, rt.expert_idx, sizeof(int32_t) * T * rt.k);
    memcpy(w, rt.weight, sizeof(float) * T * rt.k);
    /* every token goes to at most k distinct experts */
    for (int t = 0; t < T; t++) {
        int n = 0;
        for (int j = 0; j < rt.k; j++) {
            int x_e = idx[t * rt.k + j];
            assert_true(x_e >= -1 && x_e < E);
            if (x_e < 0)
                continue;
            n++;
            for (int i = 0; i < j; i++)
                assert_true(idx[t * rt.k + i] != x_e);
        }
        assert_true(n <= (kind == MOE_ROUTER_EXPERT_CHOICE ? E : kind == MOE_ROUTER_HASH ? 1 : k));
        if (kind != MOE_ROUTER_EXPERT_CHOICE)
            assert_int_equal(n, kind == MOE_ROUTER_HASH ? 1 : k);
    }
    if (rand_int(rng, 0, 3) == 0)
        for (int a = 0; a < T * rt.k; a++)
            if (rand_int(rng, 0, 9) == 0)
                idx[a] = -1;
    free(x);
    free(tok);
    moe_routing_free(&rt);
    moe_router_free(&r);
}

static double dot(const float *a, const float *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

static void test_properties(void **state)
{
    (void)state;
    loom_rng rng;
    rng_seed(&rng, 2024);
    loom_err e;
    int n_cases = 400, n_dropless = 0, n_drops = 0;
    for (int it = 0; it < n_cases; it++) {
        int T = rand_int(&rng, 1, 96), E = rand_int(&rng, 1, 12),
            k = rand_int(&rng, 1, E < 3 ? E : 3);
        int kind = rand_int(&rng, 0, 4);
        if (kind == MOE_ROUTER_LOCMOE)
            k = 1;
        int slots_max = E > k ? E : k;
        int32_t *idx = malloc(sizeof(int32_t) * T * slots_max);
        float *w = malloc(sizeof(float) * T * slots_max);
        int ks;
        random_routing(&rng, T, E, k, kind, idx, w, &ks);

        moe_plan_config pc = {0};
        pc.capacity = rand_int(&rng, 0, 2) == 0 ? 0 : rand_int(&rng, 1, 2 * T * ks / E + 2);
        pc.drop = rand_int(&rng, 0, 1) ? MOE_DROP_BY_WEIGHT : MOE_DROP_BY_POSITION;
        pc.pad = rand_int(&rng, 0, 1);
        int32_t *order = malloc(sizeof(int32_t) * E);
        for (int i = 0; i < E; i++)
            order[i] = i;
        for (int i = E - 1; i > 0; i--) {
            int j = rand_int(&rng, 0, i);
            int32_t tmp = order[i];
            order[i] = order[j];
            order[j] = tmp;
        }
        pc.expert_order = rand_int(&rng, 0, 1) ? order : NULL;
        moe_plan p;
        int rows_max = pc.pad ? E * (pc.capacity > 0 ? pc.capacity : T) : 0;
        assert_int_equal(moe_plan_init(&p, T, ks, E, rows_max, &e), 0);
        assert_int_equal(moe_plan_build(&p, &pc, idx, w, T, &e), 0);

        /* kept + dropped = assigned, and each expert within capacity */
        int64_t assigned = 0, kept = 0;
        for (int a = 0; a < T * ks; a++)
            if (idx[a] >= 0) {
                assigned++;
                kept += p.row[a] >= 0;
            } else
                assert_int_equal(p.row[a], -1);
        assert_int_equal(p.n_assigned, assigned);
        assert_int_equal(p.n_kept, kept);
        assert_int_equal(p.n_kept + p.n_dropped, p.n_assigned);
        int64_t sum_count = 0;
        for (int x = 0; x < E; x++) {
            assert_true(p.count[x] <= p.capacity);
            assert_true(p.count[x] <= p.load[x]);
            assert_true(p.rows[x] <= p.capacity || p.capacity == 0);
            sum_count += p.count[x];
            /* the drop policy: an expert drops only when full, and by its priority */
            if (p.count[x] < p.load[x]) {
                assert_int_equal(p.count[x], p.capacity);
                float min_kept = INFINITY, max_drop = -INFINITY;
                int last_kept_pos = -1, first_drop_pos = 1 << 30;
                for (int a = 0; a < T * ks; a++) {
                    if (idx[a] != x)
                        continue;
                    int pos = (a % ks) * T + a / ks; /* slot-major position */
                    if (p.row[a] >= 0) {
                        min_kept = w[a] < min_kept ? w[a] : min_kept;
                        last_kept_pos = pos > last_kept_pos ? pos : last_kept_pos;
                    } else {
                        max_drop = w[a] > max_drop ? w[a] : max_drop;
                        first_drop_pos = pos < first_drop_pos ? pos : first_drop_pos;
                    }
                }
                if (pc.drop == MOE_DROP_BY_WEIGHT)
                    assert_true(min_kept >= max_drop);
                else
                    assert_true(last_kept_pos < first_drop_pos);
            }
        }
        assert_int_equal(sum_count, p.n_kept);
        if (pc.capacity == 0) {
            assert_int_equal(p.n_dropped, 0);
            n_dropless++;
        }
        n_drops += p.n_dropped > 0;
        /* rows: a permutation of kept assignments plus padding, each inside its expert */
        for (int a = 0; a < T * ks; a++)
            if (p.row[a] >= 0) {
                int x = idx[a];
                assert_true(p.row[a] >= p.offset[x] && p.row[a] < p.offset[x] + p.rows[x]);
                assert_int_equal(p.src[p.row[a]], a);
            }
        int pad_rows = 0;
        for (int r = 0; r < p.n_rows; r++)
            pad_rows += p.src[r] < 0;
        assert_int_equal(p.n_rows, p.n_kept + pad_rows);
        if (!pc.pad)
            assert_int_equal(pad_rows, 0);

        /* combine(identity experts, dispatch(x)) = (sum of kept weights) x; = x when nothing is
         * dropped and the weights sum to 1 */
        int d = rand_int(&rng, 1, 9);
        float *x = malloc(sizeof(float) * T * d), *buf = malloc(sizeof(float) * (p.n_rows + 1) * d);
        float *y = malloc(sizeof(float) * T * d);
        for (int i = 0; i < T * d; i++)
            x[i] = rng_normal(&rng);
        moe_dispatch(&p, x, d, buf);
        moe_combine(&p, w, buf, d, y);
        for (int t = 0; t < T; t++) {
            double ws = 0;
            for (int j = 0; j < ks; j++)
                if (p.row[t * ks + j] >= 0)
                    ws += w[t * ks + j];
            for (int c = 0; c < d; c++)
                assert_true(fabs(y[t * d + c] - ws * x[t * d + c]) <=
                            1e-5 * (1 + fabs(x[t * d + c])));
        }
        for (int r = 0; r < p.n_rows; r++)
            if (p.src[r] < 0)
                for (int c = 0; c < d; c++)
                    assert_true(buf[r * d + c] == 0.0f);

        /* backward = adjoint: <dy, combine(w, out)> = <w, d_weight> = <out, d_out>;
         * <dispatch(x), b> = <x, dispatch_backward(b)> */
        float *dy = malloc(sizeof(float) * T * d), *dw = malloc(sizeof(float) * T * ks);
        float *dout = malloc(sizeof(float) * (p.n_rows + 1) * d),
              *dx = calloc((size_t)T * d, sizeof(float));
        for (int i = 0; i < T * d; i++)
            dy[i] = rng_normal(&rng);
        for (int i = 0; i < p.n_rows * d; i++)
            buf[i] = rng_normal(&rng);
        moe_combine(&p, w, buf, d, y);
        moe_combine_backward(&p, w, buf, dy, d, dw, dout);
        double lhs = dot(dy, y, (size_t)T * d);
        double sw = 0;
        for (int a = 0; a < T * ks; a++)
            sw += (double)w[a] * (p.row[a] >= 0 ? dw[a] : 0);
        assert_true(fabs(lhs - sw) <= 1e-4 * (1 + fabs(lhs)));
        assert_true(fabs(lhs - dot(buf, dout, (size_t)p.n_rows * d)) <= 1e-4 * (1 + fabs(lhs)));
        moe_dispatch(&p, x, d, buf);
        moe_dispatch_backward(&p, dout, d, dx);
        double l2 = dot(buf, dout, (size_t)p.n_rows * d), r2 = dot(x, dx, (size_t)T * d);
        assert_true(fabs(l2 - r2) <= 1e-4 * (1 + fabs(l2)));

        /* send counts: over a random topology, they sum to the kept rows, per source rank too */
        moe_topology topo;
        int nodes = rand_int(&rng, 1, 3), rpn = rand_int(&rng, 1, 4);
        assert_int_equal(moe_topology_init(&topo, nodes, rpn, E, NULL, &e), 0);
        int R = topo.n_ranks;
        int32_t *tr = malloc(sizeof(int32_t) * T);
        for (int t = 0; t < T; t++)
            tr[t] = rand_int(&rng, 0, R - 1);
        int64_t *send = malloc(sizeof(int64_t) * R * R), total = 0;
        moe_send_counts(&p, idx, tr, &topo, send);
        for (int s = 0; s < R; s++) {
            int64_t row = 0, want = 0;
            for (int r = 0; r < R; r++)
                row += send[s * R + r];
            for (int a = 0; a < T * ks; a++)
                want += p.row[a] >= 0 && tr[a / ks] == s;
            assert_int_equal(row, want);
            total += row;
        }
        assert_int_equal(total, p.n_kept);
        /* and the statistics agree with the plan */
        moe_layer_stats st;
        assert_int_equal(moe_layer_stats_compute(&topo, idx, T, ks, &p, tr, 4 * d, &st, &e), 0);
        assert_int_equal(st.assigned, p.n_assigned);
        assert_int_equal(st.kept, p.n_kept);
        assert_true(st.share_rank <= st.share_node + 1e-12);
        assert_true(st.bytes_inter_node_dedup <= st.bytes_inter_node + 1e-9);
        assert_true(st.kept_max <= p.capacity);
        double moved = 0;
        for (int s = 0; s < R; s++)
            for (int r = 0; r < R; r++)
                moved += s != r ? send[s * R + r] : 0;
        assert_true(fabs(st.bytes_intra_node + st.bytes_inter_node - moved * 4 * d) < 1e-6);

        free(tr);
        free(send);
        moe_topology_free(&topo);
        free(dy);
        free(dw);
        free(dout);
        free(dx);
        free(x);
        free(buf);
        free(y);
        free(order);
        moe_plan_free(&p);
        free(idx);
        free(w);
    }
    printf("%d random routings (%d dropless, %d with drops): all properties hold\n", n_cases,
           n_dropless, n_drops);
    assert_true(n_drops > 20 && n_dropless > 20);
}

static void test_capacity_formula(void **state)
{
    (void)state;
    assert_int_equal(moe_capacity(2, 4096, 1.25, 64, 4), 160); /* exact product stays exact */
    assert_int_equal(moe_capacity(1, 100, 1.0, 8, 4), 13);
    assert_int_equal(moe_capacity(1, 4, 1.0, 8, 4), 4); /* min_capacity */
    assert_int_equal(moe_capacity(2, 1000, 1.1, 16, 0), 138);
}

/* A small case worked by hand: 2 nodes x 2 ranks, expert e on rank e, one token per rank,
 * 100 bytes per row. */
static void test_stats_by_hand(void **state)
{
    (void)state;
    loom_err e;
    moe_topology t;
    assert_int_equal(moe_topology_init(&t, 2, 2, 4, moe_link_profile_find("h100-ndr"), &e), 0);
    int32_t idx[8] = {0, 2,  /* t0 on rank 0: own rank, other node */
                      2, 3,  /* t1 on rank 1: two ranks of the other node */
                      3, 0,  /* t2 on rank 2: same node, other node */
                      3, 2}; /* t3 on rank 3: own rank, same node */
    int32_t tr[4] = {0, 1, 2, 3};
    moe_layer_stats s;
    assert_int_equal(moe_layer_stats_compute(&t, idx, 4, 2, NULL, tr, 100, &s, &e), 0);
    assert_true(fabs(s.share_rank - 2.0 / 8) < 1e-12);
    assert_true(fabs(s.share_node - 4.0 / 8) < 1e-12);
    assert_true(s.bytes_intra_node == 200 && s.bytes_inter_node == 400);
    /* de-dup: t1 crosses once (to rank 3, its rail peer) and rank 3 forwards to rank 2 */
    assert_true(s.bytes_inter_node_dedup == 300 && s.bytes_intra_node_dedup == 300);
    assert_true(fabs(s.inter_node_share - 400.0 / 600) < 1e-12);
    assert_true(s.load_max == 3 && s.load_mean == 2);
    /* loads: e0 2, e1 0, e2 3, e3 3 */
    double load[4] = {0};
    for (int a = 0; a < 8; a++)
        load[idx[a]]++;
    double m = 2, v = 0;
    for (int i = 0; i < 4; i++)
        v += (load[i] - m) * (load[i] - m);
    assert_true(fabs(s.load_cv - sqrt(v / 4) / m) < 1e-12);
    /* rank 1 sends 200 bytes and rank 2 receives 200 over NDR: 5 us + 200 B / 50 GB/s, twice */
    const moe_link *net = &t.link.tier[MOE_TIER_NET];
    assert_true(fabs(s.a2a_time - 2 * (net->alpha + 200 / net->beta)) < 1e-15);
    assert_int_equal(s.busiest_tier, MOE_TIER_NET);
    moe_layer_stats step = {0};
    moe_stats_add(&step, &s);
    moe_stats_add(&step, &s);
    assert_int_equal(step.n_layers, 2);
    assert_true(step.bytes_inter_node == 800 && fabs(step.share_node - 0.5) < 1e-12);
    assert_true(fabs(step.a2a_time - 2 * s.a2a_time) < 1e-15);
    moe_topology_free(&t);

    /* Ascend 910A tiers: HCCS inside a group of 4, PCIe across groups, RoCE across servers */
    assert_int_equal(moe_topology_init(&t, 2, 0, 16, moe_link_profile_find("ascend-910a"), &e), 0);
    assert_int_equal(t.n_ranks, 16);
    assert_int_equal(moe_topology_tier(&t, 0, 3), MOE_TIER_GROUP);
    assert_int_equal(moe_topology_tier(&t, 0, 5), MOE_TIER_NODE);
    assert_int_equal(moe_topology_tier(&t, 0, 8), MOE_TIER_NET);
    assert_int_equal(moe_topology_tier(&t, 9, 9), MOE_TIER_RANK);
    moe_topology_free(&t);
    int n;
    const moe_link_profile *pr = moe_link_profiles(&n);
    assert_int_equal(n, 4);
    for (int i = 0; i < n; i++)
        assert_true(pr[i].tier[MOE_TIER_NET].beta < pr[i].tier[MOE_TIER_GROUP].beta);
}

/* Expert choice never exceeds its capacity and fills every expert exactly. */
static void test_expert_choice_capacity(void **state)
{
    (void)state;
    loom_err e;
    moe_router_config c;
    moe_router_config_default(&c, MOE_ROUTER_EXPERT_CHOICE, 16, 8);
    c.k = 2;
    c.capacity_factor = 1.0;
    moe_router r;
    moe_routing rt;
    assert_int_equal(moe_router_init(&r, &c, &e), 0);
    int T = 100;
    assert_int_equal(moe_routing_init(&rt, &r.cfg, T, &e), 0);
    loom_rng rng;
    rng_seed(&rng, 9);
    float *x = malloc(sizeof(float) * T * 16);
    for (int i = 0; i < T * 16; i++)
        x[i] = rng_normal(&rng);
    assert_int_equal(moe_router_forward(&r, x, NULL, T, false, &rt, &e), 0);
    int C = moe_capacity(2, T, 1.0, 8, 1), load[8] = {0};
    for (int a = 0; a < T * 8; a++)
        if (rt.expert_idx[a] >= 0)
            load[rt.expert_idx[a]]++;
    for (int i = 0; i < 8; i++)
        assert_int_equal(load[i], C);
    free(x);
    moe_routing_free(&rt);
    moe_router_free(&r);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_properties),
        cmocka_unit_test(test_capacity_formula),
        cmocka_unit_test(test_stats_by_hand),
        cmocka_unit_test(test_expert_choice_capacity),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
