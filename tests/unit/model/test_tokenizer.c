/* Tokenizer: the fixture's exact ids, decoding, streaming decode, Llama-3 style
 * post-processing, the synthetic byte tokenizer, pre-tokenizer behaviours, and errors. */
#include "testlib.h"

#include "loom/tokenizer.h"

#include <cJSON.h>
#include <sys/stat.h>
#include <time.h>

/* ---------------------------------------------------------------- helpers */

static char *read_all(const char *path)
{
    char *text = NULL;
    loom_err e = {0};
    assert_int_equal(loom_read_file(path, &text, NULL, &e), LOOM_OK);
    return text;
}

static tokenizer *load_fixture(void)
{
    const char *shared = test_require_shared();
    char *dir = test_path(shared, "fixtures/tokenizer");
    tokenizer *t = NULL;
    loom_err e = {0};
    int rc = tokenizer_load_dir(dir, &t, &e);
    if (rc)
        print_error("%s\n", e.msg);
    assert_int_equal(rc, LOOM_OK);
    free(dir);
    return t;
}

static cJSON *load_cases(void)
{
    const char *shared = test_require_shared();
    char *path = test_path(shared, "fixtures/tokenizer/tokenizer_cases.json");
    char *text = read_all(path);
    cJSON *root = cJSON_Parse(text);
    assert_non_null(root);
    free(text);
    free(path);
    return root;
}

static void assert_ids(const int32_t *got, int n_got, const cJSON *want)
{
    assert_int_equal(n_got, cJSON_GetArraySize(want));
    for (int i = 0; i < n_got; i++) {
        int w = cJSON_GetArrayItem(want, i)->valueint;
        if (got[i] != w)
            print_error("id %d: got %d, want %d\n", i, got[i], w);
        assert_int_equal(got[i], w);
    }
}

/* Length of the valid UTF-8 prefix of s[0..n) (n if it is all valid and complete). */
static size_t utf8_valid_prefix(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (k == 0 || i + k > n)
            return i;
        for (size_t j = 1; j < k; j++)
            if (((unsigned char)s[i + j] & 0xC0) != 0x80)
                return i;
        i += k;
    }
    return n;
}

/* Streams ids through detok_push; checks every chunk is whole UTF-8 and the concatenation
 * equals tokenizer_decode. Returns how many pushes produced no text (held bytes). */
static int check_streaming(const tokenizer *t, const int32_t *ids, int n, bool skip_special)
{
    char *whole = tokenizer_decode(t, ids, n, skip_special);
    detok_state st;
    detok_init(&st);
    loom_buf all;
    buf_init(&all);
    int held = 0;
    for (int i = 0; i < n; i++) {
        loom_buf chunk;
        buf_init(&chunk);
        detok_push(t, &st, ids[i], skip_special, &chunk);
        assert_int_equal(utf8_valid_prefix(chunk.data ? chunk.data : "", chunk.len), chunk.len);
        if (chunk.len == 0)
            held++;
        buf_append(&all, chunk.data, chunk.len);
        buf_free(&chunk);
    }
    loom_buf tail;
    buf_init(&tail);
    detok_flush(&st, &tail);
    buf_append(&all, tail.data, tail.len);
    buf_free(&tail);
    buf_append(&all, NULL, 0);
    assert_string_equal(all.data, whole);
    buf_free(&all);
    free(whole);
    return held;
}

/* GPT-2 bytes_to_unicode() as UTF-8 text, for building byte-level vocabularies here. */
static void byte_char(int b, char out[3])
{
    static int cp[256];
    static bool init;
    if (!init) {
        int n = 0;
        for (int i = 0; i < 256; i++) {
            bool printable = (i >= '!' && i <= '~') || (i >= 0xA1 && i <= 0xAC) || i >= 0xAE;
            cp[i] = printable ? i : 256 + n++;
        }
        init = true;
    }
    int c = cp[b];
    if (c < 0x80) {
        out[0] = (char)c;
        out[1] = 0;
    } else {
        out[0] = (char)(0xC0 | (c >> 6));
        out[1] = (char)(0x80 | (c & 0x3F));
        out[2] = 0;
    }
}

/*
 * A small byte-level tokenizer.json: the 256 byte tokens (ids 0..255), the merges given as
 * "a b" (tokens in byte-level form, Ġ = space), each merge's result getting the next id, and
 * the added tokens after them. pre_tokenizer, post_processor are JSON texts or NULL.
 */
static char *make_tokenizer_json(const char *const *merges, int n_merges, bool pair_merges,
                                 const char *const *added, int n_added, const char *pre_tokenizer,
                                 const char *post_processor, const char *model_extra)
{
    cJSON *root = cJSON_CreateObject(), *model = cJSON_CreateObject();
    cJSON *vocab = cJSON_CreateObject(), *m = cJSON_CreateArray();
    for (int b = 0; b < 256; b++) {
        char s[3];
        byte_char(b, s);
        cJSON_AddNumberToObject(vocab, s, b);
    }
    for (int i = 0; i < n_merges; i++) {
        char left[64], joined[64];
        const char *sp = strchr(merges[i], ' ');
        snprintf(left, sizeof(left), "%.*s", (int)(sp - merges[i]), merges[i]);
        snprintf(joined, sizeof(joined), "%s%s", left, sp + 1);
        if (!cJSON_GetObjectItemCaseSensitive(vocab, joined))
            cJSON_AddNumberToObject(vocab, joined, cJSON_GetArraySize(vocab));
        if (pair_merges) {
            cJSON *pair = cJSON_CreateArray();
            cJSON_AddItemToArray(pair, cJSON_CreateString(left));
            cJSON_AddItemToArray(pair, cJSON_CreateString(sp + 1));
            cJSON_AddItemToArray(m, pair);
        } else {
            cJSON_AddItemToArray(m, cJSON_CreateString(merges[i]));
        }
    }
    int next_id = cJSON_GetArraySize(vocab);
    cJSON *added_list = cJSON_CreateArray();
    for (int i = 0; i < n_added; i++) {
        cJSON *a = cJSON_CreateObject();
        cJSON_AddNumberToObject(a, "id", next_id + i);
        cJSON_AddStringToObject(a, "content", added[i]);
        cJSON_AddBoolToObject(a, "special", true);
        cJSON_AddBoolToObject(a, "lstrip", false);
        cJSON_AddBoolToObject(a, "rstrip", false);
        cJSON_AddItemToArray(added_list, a);
    }
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddItemToObject(model, "vocab", vocab);
    cJSON_AddItemToObject(model, "merges", m);
    if (model_extra) {
        cJSON *extra = cJSON_Parse(model_extra);
        assert_non_null(extra);
        cJSON *x = extra->child;
        while (x) {
            cJSON *next = x->next;
            cJSON_AddItemToObject(model, x->string, cJSON_Duplicate(x, true));
            x = next;
        }
        cJSON_Delete(extra);
    }
    cJSON_AddItemToObject(root, "added_tokens", added_list);
    cJSON_AddItemToObject(root, "normalizer", cJSON_CreateNull());
    cJSON_AddItemToObject(root, "pre_tokenizer",
                          pre_tokenizer ? cJSON_Parse(pre_tokenizer) : cJSON_CreateNull());
    cJSON_AddItemToObject(root, "post_processor",
                          post_processor ? cJSON_Parse(post_processor) : cJSON_CreateNull());
    cJSON_AddItemToObject(root, "decoder", cJSON_Parse("{\"type\":\"ByteLevel\"}"));
    cJSON_AddItemToObject(root, "model", model);
    char *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return json;
}

static tokenizer *parse_or_die(const char *json)
{
    tokenizer *t = NULL;
    loom_err e = {0};
    int rc = tokenizer_parse(json, strlen(json), &t, &e);
    if (rc)
        print_error("%s\n", e.msg);
    assert_int_equal(rc, LOOM_OK);
    return t;
}

static int encode(const tokenizer *t, const char *text, bool add_special, int32_t **ids)
{
    int n = -1;
    loom_err e = {0};
    int rc = tokenizer_encode(t, text, strlen(text), add_special, ids, &n, &e);
    if (rc)
        print_error("%s\n", e.msg);
    assert_int_equal(rc, LOOM_OK);
    return n;
}

/* ids of byte-level token strings, for expected results */
static int32_t id_of(const tokenizer *t, const char *token)
{
    int32_t id = tokenizer_token_to_id(t, token);
    if (id < 0)
        print_error("no token '%s'\n", token);
    assert_true(id >= 0);
    return id;
}

/* ---------------------------------------------------------------- the fixture */

static void test_fixture_cases(void **state)
{
    (void)state;
    tokenizer *t = load_fixture();
    cJSON *root = load_cases();
    const cJSON *c;
    int n_cases = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases"))
    {
        const char *text = cJSON_GetObjectItem(c, "text")->valuestring;
        const cJSON *want = cJSON_GetObjectItem(c, "ids");
        for (int add_special = 0; add_special < 2; add_special++) {
            /* TemplateProcessing "$A" alone: add_special adds nothing */
            int32_t *ids;
            int n = encode(t, text, add_special, &ids);
            assert_ids(ids, n, want);
            char *back = tokenizer_decode(t, ids, n, false);
            assert_string_equal(back, text);
            free(back);
            check_streaming(t, ids, n, false);
            free(ids);
        }
        n_cases++;
    }
    assert_true(n_cases >= 7);
    cJSON_Delete(root);
    tokenizer_free(t);
}

static void test_fixture_chat(void **state)
{
    (void)state;
    tokenizer *t = load_fixture();
    cJSON *root = load_cases();
    const cJSON *chat = cJSON_GetObjectItem(root, "chat");
    const cJSON *msgs = cJSON_GetObjectItem(chat, "messages");
    int n = cJSON_GetArraySize(msgs);
    chat_message *m = calloc((size_t)n, sizeof(*m));
    for (int i = 0; i < n; i++) {
        const cJSON *x = cJSON_GetArrayItem(msgs, i);
        m[i].role = cJSON_GetObjectItem(x, "role")->valuestring;
        m[i].content = cJSON_GetObjectItem(x, "content")->valuestring;
    }
    assert_non_null(tokenizer_chat_template(t));
    char *out = NULL;
    loom_err e = {0};
    int rc = chat_template_render(tokenizer_chat_template(t), m, n, true, tokenizer_bos_token(t),
                                  tokenizer_eos_token(t), &out, &e);
    if (rc)
        print_error("%s\n", e.msg);
    assert_int_equal(rc, LOOM_OK);
    assert_string_equal(out, cJSON_GetObjectItem(chat, "rendered")->valuestring);
    free(out);
    rc = tokenizer_apply_chat_template(t, m, n, true, &out, &e);
    assert_int_equal(rc, LOOM_OK);
    assert_string_equal(out, cJSON_GetObjectItem(chat, "rendered")->valuestring);

    int32_t *ids;
    int n_ids = encode(t, out, false, &ids);
    assert_ids(ids, n_ids, cJSON_GetObjectItem(chat, "ids"));
    char *back = tokenizer_decode(t, ids, n_ids, false);
    assert_string_equal(back, out);
    free(back);
    /* skipping specials drops <|im_start|>/<|im_end|> */
    back = tokenizer_decode(t, ids, n_ids, true);
    assert_string_equal(back, "system\nYou are terse.\nuser\nSpeak, friend.\nassistant\n");
    free(back);
    check_streaming(t, ids, n_ids, true);
    free(ids);
    free(out);
    free(m);
    cJSON_Delete(root);
    tokenizer_free(t);
}

static void test_fixture_specials(void **state)
{
    (void)state;
    tokenizer *t = load_fixture();
    assert_int_equal(tokenizer_vocab_size(t), 2048);
    assert_int_equal(tokenizer_token_to_id(t, "<|im_start|>"), 1);
    assert_int_equal(tokenizer_token_to_id(t, "<|im_end|>"), 2);
    assert_true(tokenizer_is_special(t, 0));
    assert_false(tokenizer_is_special(t, 200));
    /* tokenizer_config.json: bos and eos are <|endoftext|> */
    assert_int_equal(tokenizer_eos_id(t), 0);
    assert_int_equal(tokenizer_bos_id(t), 0);
    assert_string_equal(tokenizer_eos_token(t), "<|endoftext|>");
    size_t len;
    assert_null(tokenizer_id_to_bytes(t, 2048, &len));
    assert_null(tokenizer_id_to_bytes(t, -1, &len));
    const char *b = tokenizer_id_to_bytes(t, 223, &len); /* "Ġ" */
    assert_int_equal(len, 1);
    assert_int_equal(b[0], ' ');
    assert_string_equal(tokenizer_id_to_token(t, 223), "\xC4\xA0");
    tokenizer_free(t);
}

/* The café / 日本語 / 😀 case: multi-byte characters split over tokens are held back. */
static void test_streaming_utf8(void **state)
{
    (void)state;
    tokenizer *t = load_fixture();
    const char *text = "caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x98\x80!";
    int32_t *ids;
    int n = encode(t, text, false, &ids);
    int held = check_streaming(t, ids, n, false);
    assert_true(held > 0); /* some tokens end inside a character */
    char *back = tokenizer_decode(t, ids, n, false);
    assert_string_equal(back, text);
    free(back);

    /* a stream cut inside 😀: flush gives U+FFFD, never the partial bytes */
    detok_state st;
    detok_init(&st);
    loom_buf out;
    buf_init(&out);
    int32_t e_id = -1;
    for (int i = 0; i < n; i++) { /* push up to the first token that leaves bytes pending */
        detok_push(t, &st, ids[i], false, &out);
        if (st.n_pending > 0 && i > 4) {
            e_id = ids[i];
            break;
        }
    }
    assert_true(e_id >= 0);
    detok_flush(&st, &out);
    buf_append(&out, NULL, 0);
    assert_int_equal(utf8_valid_prefix(out.data, out.len), out.len);
    assert_non_null(strstr(out.data, "\xEF\xBF\xBD"));
    buf_free(&out);
    free(ids);

    /* invalid sequences (byte tokens C3 '(' FF E6 'A'): one U+FFFD each, and the stream
     * does not stall on them */
    const int bad_bytes[5] = {0xC3, '(', 0xFF, 0xE6, 'A'};
    int32_t bad_ids[5];
    for (int i = 0; i < 5; i++) {
        char s[3];
        byte_char(bad_bytes[i], s);
        bad_ids[i] = id_of(t, s);
    }
    back = tokenizer_decode(t, bad_ids, 5, false);
    assert_string_equal(back, "\xEF\xBF\xBD(\xEF\xBF\xBD\xEF\xBF\xBD"
                              "A");
    check_streaming(t, bad_ids, 5, false);
    free(back);
    tokenizer_free(t);
}

/* ---------------------------------------------------------------- Llama-3 style */

static const char LLAMA3_SPLIT[] =
    "{\"type\":\"Sequence\",\"pretokenizers\":["
    "{\"type\":\"Split\",\"pattern\":{\"Regex\":"
    "\"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| ?"
    "[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"},"
    "\"behavior\":\"Isolated\",\"invert\":false},"
    "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true,"
    "\"use_regex\":false}]}";

static const char LLAMA3_POST[] =
    "{\"type\":\"Sequence\",\"processors\":["
    "{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"trim_offsets\":false,"
    "\"use_regex\":true},"
    "{\"type\":\"TemplateProcessing\","
    "\"single\":[{\"SpecialToken\":{\"id\":\"<|begin_of_text|>\",\"type_id\":0}},"
    "{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],"
    "\"pair\":[{\"SpecialToken\":{\"id\":\"<|begin_of_text|>\",\"type_id\":0}},"
    "{\"Sequence\":{\"id\":\"A\",\"type_id\":0}},"
    "{\"SpecialToken\":{\"id\":\"<|begin_of_text|>\",\"type_id\":1}},"
    "{\"Sequence\":{\"id\":\"B\",\"type_id\":1}}],"
    "\"special_tokens\":{\"<|begin_of_text|>\":{\"id\":\"<|begin_of_text|>\","
    "\"ids\":[%d],\"tokens\":[\"<|begin_of_text|>\"]}}}]}";

static const char *const LLAMA3_MERGES[] = {
    "H e",          "l l", "ll o",           "He llo", "\xC4\xA0 w", "o r",
    "\xC4\xA0w or", "l d", "\xC4\xA0wor ld", "1 2",    "12 3",
};

static tokenizer *make_llama3(void)
{
    static const char *added[] = {"<|begin_of_text|>", "<|eot_id|>"};
    int n_merges = (int)(sizeof(LLAMA3_MERGES) / sizeof(LLAMA3_MERGES[0]));
    /* 256 bytes, then one new token per merge (all distinct here) */
    int bos = 256 + n_merges;
    char post[2048];
    snprintf(post, sizeof(post), LLAMA3_POST, bos);
    char *json = make_tokenizer_json(LLAMA3_MERGES, n_merges, true, added, 2, LLAMA3_SPLIT, post,
                                     "{\"ignore_merges\":true}");
    tokenizer *t = parse_or_die(json);
    free(json);
    assert_int_equal(tokenizer_token_to_id(t, "<|begin_of_text|>"), bos);
    return t;
}

static void test_llama3_bos(void **state)
{
    (void)state;
    tokenizer *t = make_llama3();
    int32_t bos = tokenizer_token_to_id(t, "<|begin_of_text|>");
    int32_t *ids;
    /* "Hello world" -> Split: "Hello" " world" -> ByteLevel: "Hello" "Ġworld" -> 2 merges */
    int n = encode(t, "Hello world", true, &ids);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], bos);
    assert_int_equal(ids[1], id_of(t, "Hello"));
    assert_int_equal(ids[2], id_of(t, "\xC4\xA0world"));
    int bos_count = 0;
    for (int i = 0; i < n; i++)
        bos_count += ids[i] == bos;
    assert_int_equal(bos_count, 1);
    char *back = tokenizer_decode(t, ids, n, true);
    assert_string_equal(back, "Hello world");
    free(back);
    free(ids);

    n = encode(t, "Hello world", false, &ids);
    assert_int_equal(n, 2);
    for (int i = 0; i < n; i++)
        assert_int_not_equal(ids[i], bos);
    free(ids);

    /* the empty prompt still gets its BOS */
    n = encode(t, "", true, &ids);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], bos);
    free(ids);

    /* \p{N}{1,3}: "12345" splits as "123" "45"; the 123 merge applies, 45 stays bytes */
    n = encode(t, "12345", false, &ids);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], id_of(t, "123"));
    assert_int_equal(ids[1], id_of(t, "4"));
    assert_int_equal(ids[2], id_of(t, "5"));
    free(ids);

    /* special tokens in the text are recognised; with add_special a BOS is prepended
     * regardless, as the reference does (chat prompts: encode with add_special=false) */
    n = encode(t, "<|begin_of_text|>Hello<|eot_id|>", false, &ids);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], bos);
    assert_int_equal(ids[1], id_of(t, "Hello"));
    assert_int_equal(ids[2], tokenizer_token_to_id(t, "<|eot_id|>"));
    free(ids);
    tokenizer_free(t);
}

/* ---------------------------------------------------------------- pre-tokenizers, merges */

static void test_gpt2_bytelevel(void **state)
{
    (void)state;
    static const char *merges[] = {"\xC4\xA0 t", "h e", "\xC4\xA0t he", "\xC4\xA0 \xC4\xA0"};
    const char *pre = "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true}";
    char *json = make_tokenizer_json(merges, 4, false, NULL, 0, pre, NULL, NULL);
    tokenizer *t = parse_or_die(json);
    free(json);
    int32_t *ids;
    /* " the" is one piece (" ?\p{L}+"), merged fully; "  x": "\s+(?!\S)" takes one space */
    int n = encode(t, " the  x", false, &ids);
    assert_int_equal(n, 4);
    assert_int_equal(ids[0], id_of(t, "\xC4\xA0the"));
    assert_int_equal(ids[1], id_of(t, "\xC4\xA0"));
    assert_int_equal(ids[2], id_of(t, "\xC4\xA0"));
    assert_int_equal(ids[3], id_of(t, "x"));
    free(ids);
    /* a long run of spaces: ĠĠ merges pairwise, left to right */
    n = encode(t, "     ", false, &ids);
    assert_int_equal(n, 3);
    assert_int_equal(ids[0], id_of(t, "\xC4\xA0\xC4\xA0"));
    assert_int_equal(ids[2], id_of(t, "\xC4\xA0"));
    free(ids);
    tokenizer_free(t);

    /* add_prefix_space: "the" is encoded as " the" */
    pre = "{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"use_regex\":true}";
    json = make_tokenizer_json(merges, 4, true, NULL, 0, pre, NULL, NULL);
    t = parse_or_die(json);
    free(json);
    n = encode(t, "the", false, &ids);
    assert_int_equal(n, 1);
    assert_int_equal(ids[0], id_of(t, "\xC4\xA0the"));
    free(ids);
    tokenizer_free(t);
}

/* Split behaviours, observed through a merge that would cross the cut. */
static void test_split_behaviors(void **state)
{
    (void)state;
    static const char *merges[] = {"a -", "- b", "a b", "- -"};
    struct {
        const char *behavior;
        bool invert;
        const char *text;
        const char *want[4];
    } cases[] = {
        /* pattern "-": Isolated cuts both sides */
        {"Isolated", false, "a-b", {"a", "-", "b", NULL}},
        {"Removed", false, "a-b", {"a", "b", NULL}},
        {"MergedWithPrevious", false, "a-b", {"a-", "b", NULL}},
        {"MergedWithNext", false, "a-b", {"a", "-b", NULL}},
        {"Isolated", false, "a--b", {"a", "-", "-", "b"}},
        {"Contiguous", false, "a--b", {"a", "--", "b", NULL}},
        /* invert: pattern [ab] marks what to keep, the rest ("-") is removed */
        {"Removed", true, "a-b", {"a", "b", NULL}},
    };
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
        char pre[512];
        snprintf(pre, sizeof(pre),
                 "{\"type\":\"Split\",\"pattern\":{\"String\":\"-\"},\"behavior\":\"%s\","
                 "\"invert\":%s}",
                 cases[k].behavior, cases[k].invert ? "true" : "false");
        if (cases[k].invert)
            snprintf(pre, sizeof(pre),
                     "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":"
                     "{\"Regex\":\"[ab]\"},\"behavior\":\"Removed\",\"invert\":true},"
                     "{\"type\":\"ByteLevel\",\"use_regex\":false}]}");
        char *json = make_tokenizer_json(merges, 4, false, NULL, 0, pre, NULL, NULL);
        tokenizer *t = parse_or_die(json);
        free(json);
        int32_t *ids;
        int n = encode(t, cases[k].text, false, &ids);
        int want_n = 0;
        while (want_n < 4 && cases[k].want[want_n])
            want_n++;
        if (n != want_n)
            print_error("%s: %d ids, want %d\n", cases[k].behavior, n, want_n);
        assert_int_equal(n, want_n);
        for (int i = 0; i < n; i++)
            assert_int_equal(ids[i], id_of(t, cases[k].want[i]));
        free(ids);
        tokenizer_free(t);
    }
}

/* Merges rank order, "a b" vs ["a","b"] forms, ignore_merges. */
static void test_merges(void **state)
{
    (void)state;
    /* rank decides: "b c" (rank 0) beats "a b" (rank 1) in "abc" */
    static const char *merges[] = {"b c", "a b", "a bc"};
    for (int pairs = 0; pairs < 2; pairs++) {
        char *json = make_tokenizer_json(merges, 3, pairs, NULL, 0, NULL, NULL, NULL);
        tokenizer *t = parse_or_die(json);
        free(json);
        int32_t *ids;
        int n = encode(t, "abc", false, &ids);
        assert_int_equal(n, 1);
        assert_int_equal(ids[0], id_of(t, "abc"));
        free(ids);
        n = encode(t, "abd", false, &ids);
        assert_int_equal(n, 2);
        assert_int_equal(ids[0], id_of(t, "ab"));
        free(ids);
        tokenizer_free(t);
    }
    /* ignore_merges: a word that is in the vocab is taken whole, even if merges would not
     * reach it ("xyz" is in the vocab through the merge list but "x y" comes last) */
    static const char *m2[] = {"y z", "x yz", "x y"};
    char *json = make_tokenizer_json(m2, 3, false, NULL, 0, NULL, NULL, "{\"ignore_merges\":true}");
    tokenizer *t = parse_or_die(json);
    free(json);
    int32_t *ids;
    int n = encode(t, "xyz", false, &ids);
    assert_int_equal(n, 1);
    free(ids);
    tokenizer_free(t);
}

static void test_added_token_strip(void **state)
{
    (void)state;
    char *json = make_tokenizer_json(NULL, 0, false, NULL, 0, NULL, NULL, NULL);
    cJSON *root = cJSON_Parse(json);
    free(json);
    cJSON *added = cJSON_GetObjectItem(root, "added_tokens");
    const char *spec = "[{\"id\":300,\"content\":\"<mask>\",\"lstrip\":true,\"rstrip\":true,"
                       "\"special\":true},{\"id\":301,\"content\":\"<m>\",\"special\":false},"
                       "{\"id\":302,\"content\":\"<ma\",\"special\":false}]";
    cJSON *list = cJSON_Parse(spec);
    cJSON *x;
    cJSON_ArrayForEach(x, list) cJSON_AddItemToArray(added, cJSON_Duplicate(x, true));
    cJSON_Delete(list);
    json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    tokenizer *t = parse_or_die(json);
    free(json);
    int32_t *ids;
    /* whitespace around <mask> is absorbed; the longest added token wins over "<ma" */
    int n = encode(t, "a  <mask>  b<m><ma", false, &ids);
    assert_int_equal(n, 5);
    assert_int_equal(ids[0], id_of(t, "a"));
    assert_int_equal(ids[1], 300);
    assert_int_equal(ids[2], id_of(t, "b"));
    assert_int_equal(ids[3], 301);
    assert_int_equal(ids[4], 302);
    assert_true(tokenizer_is_special(t, 300));
    assert_false(tokenizer_is_special(t, 301));
    char *back = tokenizer_decode(t, ids, n, true);
    assert_string_equal(back, "ab<m><ma");
    free(back);
    free(ids);
    tokenizer_free(t);
}

/* Text that is not UTF-8 is encoded as U+FFFD rather than rejected or crashing PCRE2. */
static void test_invalid_utf8_input(void **state)
{
    (void)state;
    tokenizer *t = load_fixture();
    const char text[] = "ok \xFF\xFE bad \xC3";
    int32_t *ids;
    int n = -1;
    loom_err e = {0};
    assert_int_equal(tokenizer_encode(t, text, sizeof(text) - 1, false, &ids, &n, &e), LOOM_OK);
    char *back = tokenizer_decode(t, ids, n, false);
    assert_string_equal(back, "ok \xEF\xBF\xBD\xEF\xBF\xBD bad \xEF\xBF\xBD");
    free(back);
    free(ids);
    /* embedded NUL bytes are text like any other */
    const char nul[] = "a\0b";
    assert_int_equal(tokenizer_encode(t, nul, 3, false, &ids, &n, &e), LOOM_OK);
    assert_int_equal(n, 3);
    free(ids);
    tokenizer_free(t);
}

/* ---------------------------------------------------------------- SentencePiece-style BPE */

#define SP "\xE2\x96\x81" /* U+2581, SentencePiece's space */

/* A Llama-2 / Mistral style tokenizer.json: no byte-level alphabet, "<0xAB>" byte tokens for
 * byte_fallback, and either the Prepend+Replace normalizer or the Metaspace pre-tokenizer. */
static tokenizer *make_sentencepiece(bool metaspace)
{
    loom_buf j;
    buf_init(&j);
    buf_puts(&j, "{\"added_tokens\":[{\"id\":0,\"content\":\"<unk>\",\"special\":true},"
                 "{\"id\":1,\"content\":\"<s>\",\"special\":true},"
                 "{\"id\":2,\"content\":\"</s>\",\"special\":true}],");
    if (metaspace)
        buf_puts(&j, "\"normalizer\":null,\"pre_tokenizer\":{\"type\":\"Metaspace\","
                     "\"replacement\":\"" SP "\",\"prepend_scheme\":\"first\",\"split\":false},");
    else
        buf_puts(&j, "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":["
                     "{\"type\":\"Prepend\",\"prepend\":\"" SP "\"},"
                     "{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":\"" SP
                     "\"}]},\"pre_tokenizer\":null,");
    buf_puts(&j, "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":["
                 "{\"SpecialToken\":{\"id\":\"<s>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\","
                 "\"type_id\":0}}],\"special_tokens\":{\"<s>\":{\"id\":\"<s>\",\"ids\":[1],"
                 "\"tokens\":[\"<s>\"]}}},");
    buf_puts(&j,
             "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\","
             "\"pattern\":{\"String\":\"" SP "\"},\"content\":\" \"},{\"type\":\"ByteFallback\"},"
             "{\"type\":\"Fuse\"},{\"type\":\"Strip\",\"content\":\" \",\"start\":1,"
             "\"stop\":0}]},");
    buf_puts(&j, "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"fuse_unk\":true,"
                 "\"byte_fallback\":true,\"vocab\":{\"<unk>\":0,\"<s>\":1,\"</s>\":2");
    for (int b = 0; b < 256; b++)
        buf_printf(&j, ",\"<0x%02X>\":%d", b, 3 + b);
    static const char *pieces[] = {SP,         "H",    "e",  "l",     "o",   "w",
                                   "r",        "d",    "ll", SP "H",  "llo", SP "He",
                                   SP "Hello", SP "w", "or", SP "wor"};
    int n_pieces = (int)(sizeof(pieces) / sizeof(pieces[0]));
    for (int i = 0; i < n_pieces; i++)
        buf_printf(&j, ",\"%s\":%d", pieces[i], 259 + i);
    buf_puts(&j, "},\"merges\":[\"l l\",\"" SP " H\",\"ll o\",\"" SP "H e\",\"" SP "He llo\",\"" SP
                 " w\",\"o r\",\"" SP "w or\"]}}");
    tokenizer *t = parse_or_die(j.data);
    buf_free(&j);
    return t;
}

static void test_sentencepiece_style(void **state)
{
    (void)state;
    for (int metaspace = 0; metaspace < 2; metaspace++) {
        tokenizer *t = make_sentencepiece(metaspace);
        int32_t *ids;
        /* "Hello world é": spaces become U+2581 (one in front); "é" is not in the vocab and
         * falls back to its two UTF-8 bytes */
        int n = encode(t, "Hello world \xC3\xA9", true, &ids);
        int32_t want[] = {1,
                          id_of(t, SP "Hello"),
                          id_of(t, SP "wor"),
                          id_of(t, "l"),
                          id_of(t, "d"),
                          id_of(t, SP),
                          3 + 0xC3,
                          3 + 0xA9};
        assert_int_equal(n, 8);
        for (int i = 0; i < n; i++)
            assert_int_equal(ids[i], want[i]);
        /* decoding is per token: the first token keeps its space (see tokenizer.c) */
        char *back = tokenizer_decode(t, ids, n, true);
        assert_string_equal(back, " Hello world \xC3\xA9");
        free(back);
        check_streaming(t, ids, n, true);
        free(ids);
        /* text after a special token: Prepend applies per segment; Metaspace "first" only at
         * the very start of the input */
        n = encode(t, "<s>Hello", false, &ids);
        assert_int_equal(ids[0], 1);
        if (metaspace) { /* H e llo */
            assert_int_equal(n, 4);
            assert_int_equal(ids[1], id_of(t, "H"));
            assert_int_equal(ids[3], id_of(t, "llo"));
        } else {
            assert_int_equal(n, 2);
            assert_int_equal(ids[1], id_of(t, SP "Hello"));
        }
        free(ids);
        tokenizer_free(t);
    }
}

/* ---------------------------------------------------------------- synthetic byte tokenizer */

static void test_create_bytes(void **state)
{
    (void)state;
    assert_null(tokenizer_create_bytes(100));
    tokenizer *t = tokenizer_create_bytes(512);
    assert_non_null(t);
    assert_int_equal(tokenizer_vocab_size(t), 512);
    assert_int_equal(tokenizer_eos_id(t), 2);
    assert_int_equal(tokenizer_bos_id(t), -1);
    assert_null(tokenizer_bos_token(t));
    assert_string_equal(tokenizer_eos_token(t), "<|im_end|>");
    int32_t *ids;
    int n = encode(t, "hi\xC3\xA9<|im_end|>", true, &ids);
    assert_int_equal(n, 5);
    assert_int_equal(ids[0], 3 + 'h');
    assert_int_equal(ids[1], 3 + 'i');
    assert_int_equal(ids[2], 3 + 0xC3);
    assert_int_equal(ids[3], 3 + 0xA9);
    assert_int_equal(ids[4], 2);
    check_streaming(t, ids, n, false);
    free(ids);
    int32_t synth[] = {300, 511, 1};
    char *s = tokenizer_decode(t, synth, 3, false);
    assert_string_equal(s, " t300 t511<|im_start|>");
    free(s);
    s = tokenizer_decode(t, synth, 3, true);
    assert_string_equal(s, " t300 t511");
    free(s);
    chat_message m[] = {{"user", "hi"}};
    char *out = NULL;
    loom_err e = {0};
    assert_int_equal(tokenizer_apply_chat_template(t, m, 1, true, &out, &e), LOOM_OK);
    assert_string_equal(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    free(out);
    tokenizer_free(t);
}

/* ---------------------------------------------------------------- loading and errors */

static char *make_dir(void)
{
    char tmpl[] = "/tmp/loom-tok-XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return strdup(d);
}

static void write_file(const char *dir, const char *name, const char *text)
{
    char *p = test_path(dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    free(p);
}

static void remove_dir(const char *dir)
{
    const char *names[] = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                           "chat_template.json"};
    for (int i = 0; i < 4; i++) {
        char *p = test_path(dir, names[i]);
        unlink(p);
        free(p);
    }
    rmdir(dir);
}

static void test_load_dir(void **state)
{
    (void)state;
    char *dir = make_dir();
    tokenizer *t = NULL;
    loom_err e = {0};
    /* missing tokenizer.json names the path */
    assert_int_equal(tokenizer_load_dir(dir, &t, &e), LOOM_ENOTFOUND);
    assert_non_null(strstr(e.msg, "tokenizer.json"));
    assert_non_null(strstr(e.msg, dir));
    assert_null(t);

    static const char *added[] = {"<s>", "</s>"};
    char *json = make_tokenizer_json(NULL, 0, false, added, 2, NULL, NULL, NULL);
    write_file(dir, "tokenizer.json", json);
    free(json);
    /* bos/eos as AddedToken objects; chat_template as a list with "default" */
    write_file(dir, "tokenizer_config.json",
               "{\"bos_token\":{\"content\":\"<s>\",\"lstrip\":false},\"eos_token\":\"</s>\","
               "\"chat_template\":[{\"name\":\"tool_use\",\"template\":\"T\"},"
               "{\"name\":\"default\",\"template\":\"{{ bos_token }}D\"}]}");
    assert_int_equal(tokenizer_load_dir(dir, &t, &e), LOOM_OK);
    assert_int_equal(tokenizer_bos_id(t), 256);
    assert_int_equal(tokenizer_eos_id(t), 257);
    assert_string_equal(tokenizer_chat_template(t), "{{ bos_token }}D");
    char *out = NULL;
    assert_int_equal(tokenizer_apply_chat_template(t, NULL, 0, false, &out, &e), LOOM_OK);
    assert_string_equal(out, "<s>D");
    free(out);
    tokenizer_free(t);

    /* chat_template.jinja wins */
    write_file(dir, "chat_template.jinja", "J{{ eos_token }}\n");
    assert_int_equal(tokenizer_load_dir(dir, &t, &e), LOOM_OK);
    assert_string_equal(tokenizer_chat_template(t), "J{{ eos_token }}\n");
    tokenizer_free(t);

    /* a malformed tokenizer_config.json is an error that names the file */
    write_file(dir, "tokenizer_config.json", "{\"bos_token\": ");
    assert_int_equal(tokenizer_load_dir(dir, &t, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, "tokenizer_config.json"));

    /* a malformed tokenizer.json: EFORMAT with the full path */
    write_file(dir, "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": [1, 2]}}");
    assert_int_equal(tokenizer_load_dir(dir, &t, &e), LOOM_EFORMAT);
    assert_non_null(strstr(e.msg, dir));
    assert_non_null(strstr(e.msg, "model.vocab"));
    remove_dir(dir);
    free(dir);
}

static void expect_parse_error(const char *json, int code, const char *needle)
{
    tokenizer *t = NULL;
    loom_err e = {0};
    int rc = tokenizer_parse(json, strlen(json), &t, &e);
    if (rc != code || !strstr(e.msg, needle))
        print_error("rc %d msg '%s' (want %d, '%s')\n", rc, e.msg, code, needle);
    assert_int_equal(rc, code);
    assert_non_null(strstr(e.msg, needle));
    assert_null(t);
}

static void test_parse_errors(void **state)
{
    (void)state;
    expect_parse_error("", LOOM_EFORMAT, "invalid JSON");
    expect_parse_error("{\"model\": {\"vocab\": {\"a\": 0}", LOOM_EFORMAT, "invalid JSON");
    expect_parse_error("[]", LOOM_EFORMAT, "not an object");
    expect_parse_error("{}", LOOM_EFORMAT, "model");
    expect_parse_error("{\"model\":{\"type\":\"WordPiece\",\"vocab\":{}}}", LOOM_EUNSUPPORTED,
                       "WordPiece");
    expect_parse_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":-1},\"merges\":[]}}",
                       LOOM_EFORMAT, "model.vocab['a']");
    expect_parse_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1},"
                       "\"merges\":[\"a b\"]}}",
                       LOOM_EFORMAT, "'ab' is not in the vocab");
    expect_parse_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[\"ab\"]}}",
                       LOOM_EFORMAT, "merges[0]");
    expect_parse_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":99999999},\"merges\":[]}}",
                       LOOM_EFORMAT, "id");
    expect_parse_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},"
                       "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(\"},"
                       "\"behavior\":\"Isolated\"}}",
                       LOOM_EFORMAT, "bad regex");
    expect_parse_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},"
                       "\"pre_tokenizer\":{\"type\":\"BertPreTokenizer\"}}",
                       LOOM_EUNSUPPORTED, "BertPreTokenizer");
    expect_parse_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},"
                       "\"decoder\":{\"type\":\"WordPiece\"}}",
                       LOOM_EUNSUPPORTED, "WordPiece");
    expect_parse_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},"
                       "\"normalizer\":{\"type\":\"Lowercase\"}}",
                       LOOM_EUNSUPPORTED, "Lowercase");
    expect_parse_error("{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0},\"merges\":[]},"
                       "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":"
                       "[{\"SpecialToken\":{\"id\":\"<s>\"}}],\"special_tokens\":{}}}",
                       LOOM_EFORMAT, "<s>");
    expect_parse_error("{\"added_tokens\":[{\"content\":\"x\"}],\"model\":{\"type\":\"BPE\","
                       "\"vocab\":{\"a\":0},\"merges\":[]}}",
                       LOOM_EFORMAT, "added_tokens[0]");
}

/* Throughput: a few KB of Shakespeare, far under a millisecond per KB. */
static void test_speed(void **state)
{
    (void)state;
    tokenizer *t = load_fixture();
    char *path = test_path(test_require_shared(), "data/tinyshakespeare.txt");
    char *text = read_all(path);
    free(path);
    size_t len = 64 * 1024;
    if (strlen(text) < len)
        len = strlen(text);
    while (len > 0 && ((unsigned char)text[len] & 0xC0) == 0x80)
        len--;
    int32_t *ids;
    int n;
    loom_err e = {0};
    assert_int_equal(tokenizer_encode(t, text, len, false, &ids, &n, &e), LOOM_OK); /* warm */
    free(ids);
    double t0 = loom_now();
    int reps = 5;
    for (int r = 0; r < reps; r++) {
        assert_int_equal(tokenizer_encode(t, text, len, false, &ids, &n, &e), LOOM_OK);
        free(ids);
    }
    double ms_per_kb = (loom_now() - t0) * 1e3 / reps / ((double)len / 1024);
    printf("encode: %.4f ms per KB (%zu bytes -> %d tokens)\n", ms_per_kb, len, n);
    /* printed, not asserted: timing belongs to benchmarks (typically ~0.1 ms per KB) */
    /* round trip of the whole slice */
    assert_int_equal(tokenizer_encode(t, text, len, false, &ids, &n, &e), LOOM_OK);
    char *back = tokenizer_decode(t, ids, n, false);
    assert_int_equal(strlen(back), len);
    assert_memory_equal(back, text, len);
    free(back);
    free(ids);
    free(text);
    tokenizer_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixture_cases),
        cmocka_unit_test(test_fixture_chat),
        cmocka_unit_test(test_fixture_specials),
        cmocka_unit_test(test_streaming_utf8),
        cmocka_unit_test(test_llama3_bos),
        cmocka_unit_test(test_gpt2_bytelevel),
        cmocka_unit_test(test_split_behaviors),
        cmocka_unit_test(test_merges),
        cmocka_unit_test(test_added_token_strip),
        cmocka_unit_test(test_invalid_utf8_input),
        cmocka_unit_test(test_sentencepiece_style),
        cmocka_unit_test(test_create_bytes),
        cmocka_unit_test(test_load_dir),
        cmocka_unit_test(test_parse_errors),
        cmocka_unit_test(test_speed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
