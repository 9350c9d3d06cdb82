/*
 * Engine text output: incremental detokenization, stop strings matched across token boundaries
 * (cut, include_stop_str_in_output, hold-back of a possible stop-string start, min_tokens), EOS
 * not in the text, UTF-8 characters split over tokens. The fake backend plays a script of
 * tokens; the tokenizer is tokenizer_create_bytes (ids 3..258 are the bytes 0..255).
 */
#include "fake_backend.h"
#include "loom/engine.h"
#include "testlib.h"

enum { VOCAB = 300, EOS_ID = 0 };

#define B(c) (3 + (int32_t)(unsigned char)(c))

typedef struct outcome {
    char text[512]; /* concatenated deltas */
    char deltas[64][64];
    int n_events;
    int n_tokens;
    finish_reason finish;
} outcome;

static tokenizer *tok;

static int setup(void **state)
{
    tok = tokenizer_create_bytes(VOCAB);
    return tok ? 0 : -1;
}

static int teardown(void **state)
{
    tokenizer_free(tok);
    return 0;
}

/* Plays script (n ids) as the model's output for one request with params p. */
static void play(const int32_t *script, int n, const sampling_params *p, outcome *o)
{
    memset(o, 0, sizeof(*o));
    engine_config c;
    engine_config_default(&c);
    c.block_size = 4;
    c.num_kv_blocks = 64;
    c.max_num_batched_tokens = 64;
    fake_backend *f;
    engine_backend be = fake_backend_create(64, 4, VOCAB, &f);
    int32_t prompt[3] = {B('>'), B('>'), B(' ')};
    f->script = script;
    f->script_len = n;
    f->script_base = 3;
    model_config mc = fake_model_config(VOCAB, 200, EOS_ID);
    engine *en;
    loom_err e = {0};
    assert_int_equal(engine_create(&c, &mc, be, tok, &en, &e), 0);
    if (engine_add(en, 1, prompt, 3, p, &e))
        fail_msg("engine_add: %s", e.msg);
    size_t len = 0;
    while (engine_has_work(en)) {
        const engine_event *ev;
        int n_ev;
        double secs;
        assert_int_equal(engine_step(en, &ev, &n_ev, &secs, &e), 0);
        for (int k = 0; k < n_ev; k++) {
            assert_non_null(ev[k].text);
            assert_true(len + ev[k].text_len < sizeof(o->text));
            memcpy(o->text + len, ev[k].text, ev[k].text_len);
            len += ev[k].text_len;
            if (o->n_events < 64 && ev[k].text_len < 64)
                memcpy(o->deltas[o->n_events], ev[k].text, ev[k].text_len);
            o->n_events++;
            o->n_tokens = ev[k].completion_tokens;
            if (ev[k].finish != FINISH_NONE)
                o->finish = ev[k].finish;
        }
    }
    o->text[len] = 0;
    engine_stats st;
    engine_get_stats(en, &st);
    assert_int_equal(st.num_free_blocks, 64);
    engine_free(en);
}

static int script_of(const char *s, int32_t *out)
{
    int n = 0;
    for (; s[n]; n++)
        out[n] = B(s[n]);
    return n;
}

static void params(sampling_params *p, int max_tokens)
{
    sampling_params_default(p);
    p->temperature = 0;
    p->max_tokens = max_tokens;
}

static void test_plain_text(void **state)
{
    int32_t s[64];
    int n = script_of("Hello", s);
    sampling_params p;
    params(&p, n);
    outcome o;
    play(s, n, &p, &o);
    assert_string_equal(o.text, "Hello");
    assert_int_equal(o.finish, FINISH_LENGTH);
    assert_int_equal(o.n_events, 5);
    assert_string_equal(o.deltas[0], "H");
    assert_string_equal(o.deltas[4], "o");
}

static void test_stop_across_tokens(void **state)
{
    int32_t s[64];
    int n = script_of("Hello, STOP world", s);
    sampling_params p;
    params(&p, 40);
    char stop[] = "STOP";
    p.n_stop = 1;
    p.stop[0] = stop;
    outcome o;
    play(s, n, &p, &o);
    assert_string_equal(o.text, "Hello, ");
    assert_int_equal(o.finish, FINISH_STOP);
    assert_int_equal(o.n_tokens, 11); /* up to the P */
    /* S, T, O were held back (they might start STOP), P completed it */
    assert_string_equal(o.deltas[6], " ");
    for (int i = 7; i < 11; i++)
        assert_string_equal(o.deltas[i], "");

    p.include_stop_str_in_output = true;
    play(s, n, &p, &o);
    assert_string_equal(o.text, "Hello, STOP");
    assert_int_equal(o.finish, FINISH_STOP);
    assert_int_equal(o.n_tokens, 11);
    assert_string_equal(o.deltas[7], "S"); /* nothing is held back when the stop is kept */
    assert_string_equal(o.deltas[10], "P");

    /* with two stop strings, the window keeps enough emitted text for the longer one */
    char other[] = "worldwide";
    p.n_stop = 2;
    p.stop[1] = other;
    n = script_of("ab STO STOP cd", s);
    play(s, n, &p, &o);
    assert_string_equal(o.text, "ab STO STOP");
}

static void test_false_start_released(void **state)
{
    int32_t s[64];
    int n = script_of("xSTx STOP", s);
    sampling_params p;
    params(&p, 40);
    char stop[] = "STOP";
    p.n_stop = 1;
    p.stop[0] = stop;
    outcome o;
    play(s, n, &p, &o);
    assert_string_equal(o.text, "xSTx ");
    assert_string_equal(o.deltas[1], "");
    assert_string_equal(o.deltas[2], "");
    assert_string_equal(o.deltas[3], "STx");

    /* finishing by length releases what was held back */
    n = script_of("abcST", s);
    params(&p, n);
    p.n_stop = 1;
    p.stop[0] = stop;
    play(s, n, &p, &o);
    assert_string_equal(o.text, "abcST");
    assert_int_equal(o.finish, FINISH_LENGTH);
}

static void test_stop_inside_token_and_earliest(void **state)
{
    /* token 260 decodes to " t260": the stop string lies inside one token */
    int32_t s[4] = {B('a'), 260, B('b')};
    sampling_params p;
    params(&p, 10);
    char st1[] = "t26";
    p.n_stop = 1;
    p.stop[0] = st1;
    outcome o;
    play(s, 3, &p, &o);
    assert_string_equal(o.text, "a ");
    assert_int_equal(o.n_tokens, 2);

    /* the earliest match wins, whatever the order of the stop strings */
    int32_t h[64];
    int n = script_of("Hello world", h);
    char w[] = "world", lo[] = "lo";
    params(&p, 40);
    p.n_stop = 2;
    p.stop[0] = w;
    p.stop[1] = lo;
    play(h, n, &p, &o);
    assert_string_equal(o.text, "Hel");
    assert_int_equal(o.n_tokens, 5);
}

static void test_min_tokens_and_stop(void **state)
{
    int32_t s[64];
    int n = script_of("aaab", s);
    sampling_params p;
    params(&p, 10);
    char a[] = "a";
    p.n_stop = 1;
    p.stop[0] = a;
    p.min_tokens = 2;
    outcome o;
    play(s, n, &p, &o);
    /* the first "a" came before min_tokens: kept; the second one stops */
    assert_string_equal(o.text, "a");
    assert_int_equal(o.n_tokens, 2);
    assert_int_equal(o.finish, FINISH_STOP);
}

static void test_eos_and_special(void **state)
{
    int32_t s[8] = {B('a'), B('b'), EOS_ID, B('c')};
    sampling_params p;
    params(&p, 10);
    outcome o;
    play(s, 4, &p, &o);
    assert_string_equal(o.text, "ab"); /* the EOS is not text */
    assert_int_equal(o.n_tokens, 3);
    assert_int_equal(o.finish, FINISH_STOP);

    /* ignore_eos: EOS is a token like another (special, skipped in the text) */
    p.ignore_eos = true;
    play(s, 4, &p, &o);
    assert_string_equal(o.text, "abc");
    assert_int_equal(o.n_tokens, 10); /* the script then plays id 0 */
    assert_int_equal(o.finish, FINISH_LENGTH);

    /* min_tokens masks the EOS: the script's EOS is replaced by the next best token */
    params(&p, 10);
    p.min_tokens = 4;
    play(s, 4, &p, &o);
    assert_true(o.n_tokens >= 5);

    /* special tokens in the text when asked */
    int32_t sp[3] = {1, B('x'), 1};
    params(&p, 3);
    p.skip_special_tokens = false;
    play(sp, 3, &p, &o);
    assert_string_equal(o.text, "<|im_start|>x<|im_start|>");
    p.skip_special_tokens = true;
    play(sp, 3, &p, &o);
    assert_string_equal(o.text, "x");
}

static void test_utf8(void **state)
{
    /* "café" with é = C3 A9 split over two tokens: no delta splits the character */
    int32_t s[8] = {B('c'), B('a'), B('f'), B('\xc3'), B('\xa9'), B('!')};
    sampling_params p;
    params(&p, 6);
    outcome o;
    play(s, 6, &p, &o);
    assert_string_equal(o.text, "caf\xc3\xa9!");
    assert_string_equal(o.deltas[3], "");
    assert_string_equal(o.deltas[4], "\xc3\xa9");

    /* a stop string that is the multi-byte character */
    char e_acute[] = "\xc3\xa9";
    params(&p, 6);
    p.n_stop = 1;
    p.stop[0] = e_acute;
    play(s, 6, &p, &o);
    assert_string_equal(o.text, "caf");
    assert_int_equal(o.finish, FINISH_STOP);

    /* an incomplete character at the end becomes U+FFFD */
    int32_t t[2] = {B('z'), B('\xc3')};
    params(&p, 2);
    play(t, 2, &p, &o);
    assert_string_equal(o.text, "z\xef\xbf\xbd");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain_text),
        cmocka_unit_test(test_stop_across_tokens),
        cmocka_unit_test(test_false_start_released),
        cmocka_unit_test(test_stop_inside_token_and_earliest),
        cmocka_unit_test(test_min_tokens_and_stop),
        cmocka_unit_test(test_eos_and_special),
        cmocka_unit_test(test_utf8),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
