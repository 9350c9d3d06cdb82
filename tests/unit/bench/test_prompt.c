/* Token-id prompts: exact lengths, shared-prefix blocks, determinism, JSON form. */
#include "testlib.h"

#include "loom/bench.h"

static void test_ids_exact_and_in_range(void **state)
{
    bench_prompter *p = bench_prompter_ids(16, 256);
    assert_false(bench_prompter_is_text(p));
    assert_int_equal(bench_prompter_n_special(p), 0);
    int lens[] = {1, 2, 7, 511, 512, 513, 4000};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        bench_item item = {.input_len = lens[i], .output_len = 1};
        bench_prompt pr;
        bench_prompt_build(p, &item, 1, i, &pr);
        assert_int_equal(pr.n_ids, lens[i]);
        assert_int_equal(pr.expected_tokens, lens[i]);
        assert_null(pr.text);
        for (int j = 0; j < pr.n_ids; j++)
            assert_true(pr.ids[j] >= 16 && pr.ids[j] < 256);
        bench_prompt_free(&pr);
    }
    bench_prompter_free(p);
}

static void test_ids_deterministic_and_salted(void **state)
{
    bench_prompter *p = bench_prompter_ids(0, 50000);
    bench_item item = {.input_len = 64};
    bench_prompt a, b, c, d;
    bench_prompt_build(p, &item, 5, 1, &a);
    bench_prompt_build(p, &item, 5, 1, &b);
    bench_prompt_build(p, &item, 5, 2, &c); /* another request */
    bench_prompt_build(p, &item, 6, 1, &d); /* another round */
    assert_memory_equal(a.ids, b.ids, 64 * sizeof(int32_t));
    assert_true(memcmp(a.ids, c.ids, 64 * sizeof(int32_t)) != 0);
    assert_true(a.ids[0] != c.ids[0] || a.ids[1] != c.ids[1]); /* no shared prefix */
    assert_true(memcmp(a.ids, d.ids, 64 * sizeof(int32_t)) != 0);
    bench_prompt_free(&a);
    bench_prompt_free(&b);
    bench_prompt_free(&c);
    bench_prompt_free(&d);
    bench_prompter_free(p);
}

/* Requests naming the same leading hash ids share those 512-token blocks, and only those. */
static void test_ids_shared_prefix(void **state)
{
    bench_prompter *p = bench_prompter_ids(0, 32000);
    int64_t ha[] = {0, 1, 2}, hb[] = {0, 1, 3}, hc[] = {9};
    bench_item a = {.input_len = 1300, .hash_ids = ha, .n_hash_ids = 3};
    bench_item b = {.input_len = 1100, .hash_ids = hb, .n_hash_ids = 3};
    bench_item c = {.input_len = 700, .hash_ids = hc, .n_hash_ids = 1};
    bench_prompt pa, pb, pc;
    bench_prompt_build(p, &a, 3, 100, &pa);
    bench_prompt_build(p, &b, 3, 101, &pb);
    bench_prompt_build(p, &c, 3, 102, &pc);
    assert_int_equal(pa.n_ids, 1300);
    assert_int_equal(pb.n_ids, 1100);
    assert_memory_equal(pa.ids, pb.ids, 1024 * sizeof(int32_t));
    int same = 0;
    for (int j = 1024; j < 1100; j++)
        same += pa.ids[j] == pb.ids[j];
    assert_true(same < 10);
    same = 0;
    for (int j = 0; j < 700; j++)
        same += pa.ids[j] == pc.ids[j];
    assert_true(same < 10);
    /* a partial last block is the start of that block */
    int64_t hd[] = {0};
    bench_item d = {.input_len = 100, .hash_ids = hd, .n_hash_ids = 1};
    bench_prompt pd;
    bench_prompt_build(p, &d, 3, 7, &pd);
    assert_memory_equal(pa.ids, pd.ids, 100 * sizeof(int32_t));
    /* another seed (round): other blocks */
    bench_prompt pe;
    bench_prompt_build(p, &a, 4, 100, &pe);
    assert_true(memcmp(pa.ids, pe.ids, 512 * sizeof(int32_t)) != 0);
    bench_prompt_free(&pa);
    bench_prompt_free(&pb);
    bench_prompt_free(&pc);
    bench_prompt_free(&pd);
    bench_prompt_free(&pe);
    bench_prompter_free(p);
}

static void test_json_forms(void **state)
{
    bench_prompter *p = bench_prompter_ids(7, 8);
    bench_item item = {.input_len = 3};
    bench_prompt pr;
    bench_prompt_build(p, &item, 0, 0, &pr);
    loom_buf b;
    buf_init(&b);
    bench_prompt_json(&pr, &b);
    buf_append(&b, "", 1);
    assert_string_equal(b.data, "[7,7,7]");
    buf_free(&b);
    bench_prompt_free(&pr);
    bench_prompter_free(p);

    const char *words[20];
    char store[20][8];
    for (int i = 0; i < 20; i++) {
        snprintf(store[i], sizeof(store[i]), " w%c", 'a' + i);
        words[i] = store[i];
    }
    assert_int_equal(bench_prompter_from_words(words, 20, 1, &p, NULL), 0);
    assert_true(bench_prompter_is_text(p));
    item.input_len = 5; /* 4 words + the server's BOS */
    bench_prompt_build(p, &item, 0, 0, &pr);
    assert_int_equal(pr.expected_tokens, 5);
    int n_words = 0;
    for (size_t i = 0; i < pr.text_len; i++)
        n_words += pr.text[i] == ' ';
    assert_int_equal(n_words, 4);
    buf_init(&b);
    bench_prompt_json(&pr, &b);
    assert_true(b.data[0] == '"' && b.data[b.len - 1] == '"');
    buf_free(&b);
    bench_prompt_free(&pr);
    /* shorter than the specials: one word at least */
    item.input_len = 1;
    bench_prompt_build(p, &item, 0, 0, &pr);
    assert_int_equal(pr.expected_tokens, 2);
    bench_prompt_free(&pr);
    bench_prompter_free(p);

    /* too few usable words: refused */
    const char *few[] = {" a", " b", "nospace", " sp ace"};
    loom_err e;
    assert_int_equal(bench_prompter_from_words(few, 4, 0, &p, &e), LOOM_EUNSUPPORTED);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ids_exact_and_in_range),
        cmocka_unit_test(test_ids_deterministic_and_salted),
        cmocka_unit_test(test_ids_shared_prefix),
        cmocka_unit_test(test_json_forms),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
