/* The baseline policies on hand-made snapshots: rotation, ties, unavailable instances, the
 * avoid list, weights, and the registry. */
#include "testlib.h"

#include "loom/policy.h"

#define N 4

static policy *make(const char *name)
{
    policy_config cfg;
    policy_config_default(&cfg);
    cfg.seed = 7;
    policy *p = NULL;
    loom_err e = {0};
    assert_int_equal(policy_create(name, &cfg, &p, &e), 0);
    assert_non_null(p);
    assert_string_equal(policy_name(p), name);
    return p;
}

static void snapshot(policy_instance *inst, int n)
{
    for (int i = 0; i < n; i++)
        policy_instance_init(&inst[i], NULL, 1, 0, 0, 0);
}

static policy_request plain_request(void)
{
    policy_request r;
    memset(&r, 0, sizeof(r));
    r.prompt_tokens = 100;
    r.expected_output = 50;
    return r;
}

/* select then dispatch, as a driver would; returns the choice */
static int pick(policy *p, policy_instance *inst, int n, const policy_request *r, double now,
                policy_ticket *t)
{
    int i = policy_select(p, inst, n, r, now);
    if (i >= 0)
        policy_dispatch(p, inst, n, i, r, now, t);
    return i;
}

static void test_registry(void **state)
{
    (void)state;
    assert_true(policy_count() >= 6);
    const char *names[] = {"round_robin",          "random",
                           "least_requests",       "power_of_two",
                           "weighted_round_robin", "capacity_aware"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        assert_non_null(policy_find(names[i]));
        assert_non_null(policy_find(names[i])->summary);
    }
    policy *p = NULL;
    loom_err e = {0};
    assert_int_equal(policy_create("fastest_first", NULL, &p, &e), LOOM_ENOTFOUND);
    assert_null(p);
    assert_non_null(strstr(e.msg, "round_robin")); /* the message lists the known ones */
    policy_config bad;
    policy_config_default(&bad);
    bad.kv_headroom = 1.5;
    assert_int_equal(policy_create("capacity_aware", &bad, &p, &e), LOOM_EINVAL);
}

static void test_round_robin_rotates_and_skips(void **state)
{
    (void)state;
    policy *p = make("round_robin");
    policy_instance inst[N];
    snapshot(inst, N);
    policy_request r = plain_request();
    policy_ticket t;
    int seq[8];
    for (int k = 0; k < 8; k++)
        seq[k] = pick(p, inst, N, &r, k, &t);
    for (int k = 0; k < 8; k++)
        assert_int_equal(seq[k], k % N);
    /* select alone does not advance */
    assert_int_equal(policy_select(p, inst, N, &r, 9), 0);
    assert_int_equal(policy_select(p, inst, N, &r, 9), 0);
    /* unavailable instances are skipped */
    inst[0].available = false;
    inst[2].available = false;
    assert_int_equal(pick(p, inst, N, &r, 10, &t), 1);
    assert_int_equal(pick(p, inst, N, &r, 11, &t), 3);
    assert_int_equal(pick(p, inst, N, &r, 12, &t), 1);
    /* the avoid list (a retry) */
    r.avoid[0] = 3;
    r.n_avoid = 1;
    assert_int_equal(policy_select(p, inst, N, &r, 13), 1);
    r.avoid[1] = 1;
    r.n_avoid = 2;
    assert_int_equal(policy_select(p, inst, N, &r, 13), POLICY_UNAVAILABLE);
    /* all unavailable */
    r.n_avoid = 0;
    for (int i = 0; i < N; i++)
        inst[i].available = false;
    assert_int_equal(policy_select(p, inst, N, &r, 14), POLICY_UNAVAILABLE);
    assert_int_equal(policy_select(p, inst, 0, &r, 14), POLICY_UNAVAILABLE);
    policy_free(p);
}

static void test_round_robin_ignores_load(void **state)
{
    (void)state;
    policy *p = make("round_robin");
    policy_instance inst[2];
    snapshot(inst, 2);
    inst[0].kv_capacity = 10; /* full beyond hope: round robin does not look */
    policy_request r = plain_request();
    policy_ticket t[4];
    for (int k = 0; k < 4; k++)
        assert_int_equal(pick(p, inst, 2, &r, k, &t[k]), k % 2);
    assert_int_equal(inst[0].outstanding, 2);
    assert_int_equal(inst[1].outstanding, 2);
    policy_free(p);
}

static void test_random_uniform_and_available_only(void **state)
{
    (void)state;
    policy *p = make("random");
    policy_instance inst[N];
    snapshot(inst, N);
    inst[1].available = false;
    policy_request r = plain_request();
    int count[N] = {0};
    for (int k = 0; k < 3000; k++) {
        int i = policy_select(p, inst, N, &r, k);
        assert_true(i >= 0 && i < N);
        count[i]++;
    }
    assert_int_equal(count[1], 0);
    for (int i = 0; i < N; i++)
        if (i != 1)
            assert_true(count[i] > 850 && count[i] < 1150); /* 1000 expected; > 6 sigma slack */
    for (int i = 0; i < N; i++)
        inst[i].available = false;
    assert_int_equal(policy_select(p, inst, N, &r, 0), POLICY_UNAVAILABLE);
    policy_free(p);
}

static void test_least_requests_with_ties(void **state)
{
    (void)state;
    policy *p = make("least_requests");
    policy_instance inst[3];
    snapshot(inst, 3);
    inst[0].outstanding = 5;
    inst[1].outstanding = 2;
    inst[2].outstanding = 7;
    policy_request r = plain_request();
    assert_int_equal(policy_select(p, inst, 3, &r, 0), 1);
    inst[1].available = false; /* unhealthy: the least loaded of the rest */
    assert_int_equal(policy_select(p, inst, 3, &r, 0), 0);
    inst[1].available = true;
    /* ties rotate: from all-equal, dispatching keeps the counts level */
    for (int i = 0; i < 3; i++)
        inst[i].outstanding = 0;
    policy_ticket t[6];
    int seen[3] = {0};
    for (int k = 0; k < 6; k++)
        seen[pick(p, inst, 3, &r, k, &t[k])]++;
    assert_int_equal(seen[0], 2);
    assert_int_equal(seen[1], 2);
    assert_int_equal(seen[2], 2);
    /* completion frees a slot: that instance is chosen next */
    policy_outcome o = {.ok = true, .prompt_tokens = -1, .completion_tokens = -1};
    policy_complete(p, inst, &t[4], &o, 10);
    assert_int_equal(policy_select(p, inst, 3, &r, 10), t[4].instance);
    policy_free(p);
}

static void test_power_of_two(void **state)
{
    (void)state;
    policy *p = make("power_of_two");
    policy_instance inst[N];
    snapshot(inst, N);
    policy_request r = plain_request();
    /* one heavily loaded instance is never chosen when a sample holds another */
    inst[2].outstanding = 100;
    int count[N] = {0};
    for (int k = 0; k < 2000; k++)
        count[policy_select(p, inst, N, &r, k)]++;
    assert_int_equal(count[2], 0);
    /* the others share evenly (ties broken at random) */
    for (int i = 0; i < N; i++)
        if (i != 2)
            assert_true(count[i] > 450 && count[i] < 880);
    /* a single candidate is always it */
    for (int i = 0; i < N; i++)
        inst[i].available = i == 3;
    for (int k = 0; k < 10; k++)
        assert_int_equal(policy_select(p, inst, N, &r, k), 3);
    inst[3].available = false;
    assert_int_equal(policy_select(p, inst, N, &r, 0), POLICY_UNAVAILABLE);
    policy_free(p);
}

static void test_weighted_round_robin(void **state)
{
    (void)state;
    policy *p = make("weighted_round_robin");
    policy_instance inst[3];
    policy_instance_init(&inst[0], NULL, 5, 0, 0, 0);
    policy_instance_init(&inst[1], NULL, 1, 0, 0, 0);
    policy_instance_init(&inst[2], NULL, 1, 0, 0, 0);
    policy_request r = plain_request();
    policy_ticket t;
    /* nginx's smooth sequence for {5, 1, 1}: a a b a c a a */
    const int want[7] = {0, 0, 1, 0, 2, 0, 0};
    for (int k = 0; k < 7; k++)
        assert_int_equal(pick(p, inst, 3, &r, k, &t), want[k]);
    /* proportions over many rounds, with one instance unhealthy for a while */
    int count[3] = {0};
    for (int k = 0; k < 700; k++)
        count[pick(p, inst, 3, &r, k, &t)]++;
    assert_int_equal(count[0], 500);
    assert_int_equal(count[1], 100);
    assert_int_equal(count[2], 100);
    inst[0].available = false;
    memset(count, 0, sizeof(count));
    for (int k = 0; k < 100; k++)
        count[pick(p, inst, 3, &r, k, &t)]++;
    assert_int_equal(count[0], 0);
    assert_true(count[1] >= 49 && count[1] <= 51);
    policy_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_registry),
        cmocka_unit_test(test_round_robin_rotates_and_skips),
        cmocka_unit_test(test_round_robin_ignores_load),
        cmocka_unit_test(test_random_uniform_and_available_only),
        cmocka_unit_test(test_least_requests_with_ties),
        cmocka_unit_test(test_power_of_two),
        cmocka_unit_test(test_weighted_round_robin),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
