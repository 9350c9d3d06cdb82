/* Text prompts with the fixture tokenizer (../shared/fixtures/tokenizer): exact token counts
 * as the tokenizer encodes them, a BOS-adding variant, and Mooncake shared prefixes that give
 * identical leading tokens. */
#include "testlib.h"

#include "loom/bench.h"
#include "loom/tokenizer.h"

#include <cJSON.h>

static tokenizer *g_tok;     /* the fixture */
static tokenizer *g_tok_bos; /* the fixture with a post_processor that adds <|endoftext|> */

static int setup(void **state)
{
    const char *shared = test_require_shared();
    char *dir = test_path(shared, "fixtures/tokenizer");
    loom_err e;
    if (tokenizer_load_dir(dir, &g_tok, &e) != 0) {
        printf("cannot load %s: %s\n", dir, e.msg);
        return -1;
    }
    /* the same vocabulary, with "single": [<|endoftext|>, $A] */
    char *json_path = test_path(dir, "tokenizer.json");
    char *text = NULL;
    size_t len = 0;
    if (loom_read_file(json_path, &text, &len, &e) != 0)
        return -1;
    cJSON *root = cJSON_ParseWithLength(text, len);
    cJSON *post = cJSON_Parse(
        "{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":"
        "\"<|endoftext|>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],"
        "\"pair\":[{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],\"special_tokens\":{"
        "\"<|endoftext|>\":{\"id\":\"<|endoftext|>\",\"ids\":[0],\"tokens\":[\"<|endoftext|>\"]}}"
        "}");
    cJSON_ReplaceItemInObject(root, "post_processor", post);
    char *modified = cJSON_PrintUnformatted(root);
    if (tokenizer_parse(modified, strlen(modified), &g_tok_bos, &e) != 0) {
        printf("cannot parse the BOS variant: %s\n", e.msg);
        return -1;
    }
    free(modified);
    cJSON_Delete(root);
    free(text);
    free(json_path);
    free(dir);
    return 0;
}

static int teardown(void **state)
{
    tokenizer_free(g_tok);
    tokenizer_free(g_tok_bos);
    return 0;
}

static int count_tokens(const tokenizer *tok, const bench_prompt *pr, int32_t **ids_out)
{
    int32_t *ids = NULL;
    int n = 0;
    loom_err e;
    if (tokenizer_encode(tok, pr->text, pr->text_len, true, &ids, &n, &e) != 0)
        fail_msg("encode: %s", e.msg);
    if (ids_out)
        *ids_out = ids;
    else
        free(ids);
    return n;
}

static void check_exact(const tokenizer *tok, int want_special)
{
    bench_prompter *p = NULL;
    loom_err e;
    if (bench_prompter_from_tokenizer(tok, &p, &e) != 0)
        fail_msg("%s", e.msg);
    assert_true(bench_prompter_is_text(p));
    assert_int_equal(bench_prompter_n_special(p), want_special);
    int lens[] = {2, 3, 5, 17, 100, 511, 512, 513, 1000, 3000};
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        for (uint64_t salt = 0; salt < 5; salt++) {
            bench_item item = {.input_len = lens[i]};
            bench_prompt pr;
            bench_prompt_build(p, &item, 11, salt, &pr);
            assert_int_equal(pr.expected_tokens, lens[i]);
            int got = count_tokens(tok, &pr, NULL);
            if (got != lens[i])
                fail_msg("%d tokens requested, the tokenizer counts %d", lens[i], got);
            bench_prompt_free(&pr);
        }
    }
    bench_prompter_free(p);
}

static void test_exact_counts(void **state)
{
    check_exact(g_tok, 0);
}

static void test_exact_counts_with_bos(void **state)
{
    check_exact(g_tok_bos, 1);
}

/* Mooncake's first requests share hash id 0: their first 512 tokens are the same. */
static void test_shared_prefix_tokens(void **state)
{
    bench_prompter *p = NULL;
    loom_err e;
    assert_int_equal(bench_prompter_from_tokenizer(g_tok, &p, &e), 0);
    int64_t ha[] = {0, 1, 2}, hb[] = {0, 1, 7}, hc[] = {5, 1, 2};
    bench_item a = {.input_len = 1400, .hash_ids = ha, .n_hash_ids = 3};
    bench_item b = {.input_len = 1200, .hash_ids = hb, .n_hash_ids = 3};
    bench_item c = {.input_len = 1400, .hash_ids = hc, .n_hash_ids = 3};
    bench_prompt pa, pb, pc;
    bench_prompt_build(p, &a, 1, 10, &pa);
    bench_prompt_build(p, &b, 1, 11, &pb);
    bench_prompt_build(p, &c, 1, 12, &pc);
    int32_t *ia, *ib, *ic;
    assert_int_equal(count_tokens(g_tok, &pa, &ia), 1400);
    assert_int_equal(count_tokens(g_tok, &pb, &ib), 1200);
    assert_int_equal(count_tokens(g_tok, &pc, &ic), 1400);
    assert_memory_equal(ia, ib, 1024 * sizeof(int32_t));
    int diverge = 1024;
    while (diverge < 1200 && ia[diverge] == ib[diverge])
        diverge++;
    assert_true(diverge < 1034); /* block 2 vs block 7 */
    /* c starts with another block: no shared prefix, even though later ids repeat */
    int same = 0;
    while (same < 1400 && ia[same] == ic[same])
        same++;
    assert_true(same < 10);
    free(ia);
    free(ib);
    free(ic);
    bench_prompt_free(&pa);
    bench_prompt_free(&pb);
    bench_prompt_free(&pc);
    bench_prompter_free(p);
}

/* The real trace: its first requests (hash ids starting 0) share their first block. */
static void test_mooncake_trace_prefixes(void **state)
{
    const char *shared = test_shared_dir();
    char *path = test_path(shared, "data/traces/mooncake_conversation.jsonl");
    bench_trace t;
    loom_err e;
    if (bench_trace_load(path, &t, &e) != 0)
        fail_msg("%s", e.msg);
    bench_prompter *p = NULL;
    assert_int_equal(bench_prompter_from_tokenizer(g_tok, &p, &e), 0);
    bench_workload w = {.trace = &t};
    bench_item i0, i1;
    bench_workload_item(&w, 0, &i0);
    bench_workload_item(&w, 1, &i1);
    assert_true(i0.hash_ids[0] == i1.hash_ids[0] && i0.hash_ids[1] != i1.hash_ids[1]);
    bench_prompt p0, p1;
    bench_prompt_build(p, &i0, 1, 0, &p0);
    bench_prompt_build(p, &i1, 1, 1, &p1);
    int32_t *a, *b;
    assert_int_equal(count_tokens(g_tok, &p0, &a), i0.input_len);
    assert_int_equal(count_tokens(g_tok, &p1, &b), i1.input_len);
    assert_memory_equal(a, b, BENCH_BLOCK_TOKENS * sizeof(int32_t));
    assert_true(memcmp(a + BENCH_BLOCK_TOKENS, b + BENCH_BLOCK_TOKENS, 16 * sizeof(int32_t)));
    free(a);
    free(b);
    bench_prompt_free(&p0);
    bench_prompt_free(&p1);
    bench_prompter_free(p);
    bench_trace_free(&t);
    free(path);
}

/* Chat prompts: the template's tokens are counted, the rendered chat is exact. */
static void test_chat_overhead(void **state)
{
    bench_prompter *p = NULL;
    loom_err e;
    assert_int_equal(bench_prompter_from_tokenizer(g_tok, &p, &e), 0);
    int overhead = -1;
    if (bench_chat_overhead(p, g_tok, &overhead, &e) != 0)
        fail_msg("%s", e.msg);
    assert_true(overhead > 0);
    bench_prompter_set_special(p, overhead);
    int lens[] = {overhead + 1, 50, 600};
    for (size_t i = 0; i < 3; i++) {
        bench_item item = {.input_len = lens[i]};
        bench_prompt pr;
        bench_prompt_build(p, &item, 2, i, &pr);
        chat_message m = {"user", pr.text};
        char *text = NULL;
        assert_int_equal(tokenizer_apply_chat_template(g_tok, &m, 1, true, &text, &e), 0);
        int32_t *ids = NULL;
        int n = 0;
        assert_int_equal(tokenizer_encode(g_tok, text, strlen(text), false, &ids, &n, &e), 0);
        assert_int_equal(n, lens[i]);
        free(ids);
        free(text);
        bench_prompt_free(&pr);
    }
    bench_prompter_free(p);
}

/* A tokenizer without " word" pieces (the byte-level one of random presets) is refused, so
 * the caller falls back to token ids. */
static void test_byte_tokenizer_refused(void **state)
{
    tokenizer *t = tokenizer_create_bytes(512);
    bench_prompter *p = NULL;
    loom_err e;
    assert_int_equal(bench_prompter_from_tokenizer(t, &p, &e), LOOM_EUNSUPPORTED);
    assert_null(p);
    tokenizer_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact_counts),         cmocka_unit_test(test_exact_counts_with_bos),
        cmocka_unit_test(test_shared_prefix_tokens), cmocka_unit_test(test_mooncake_trace_prefixes),
        cmocka_unit_test(test_chat_overhead),        cmocka_unit_test(test_byte_tokenizer_refused),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
