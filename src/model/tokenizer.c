/*
 * tokenizer: Hugging Face tokenizer.json byte-level BPE.
 *
 * Encoding follows the pipeline of the `tokenizers` library:
 *
 *   text --(added tokens, leftmost-longest)--> segments
 *        --normalizer--> --pre_tokenizer (Split / ByteLevel / Sequence ...)--> pieces
 *        --BPE (merges by rank)--> ids --post_processor (TemplateProcessing ...)--> ids
 *
 * Text that is not valid UTF-8 is first made valid (each invalid sequence becomes U+FFFD), as
 * Python would when it decodes the request body. The NFC normalizer is accepted and treated as
 * the identity: exact for text already in NFC (what keyboards, browsers and APIs send); a
 * decomposed "e" + U+0301 is tokenized as written where the reference would compose it first.
 *
 * SentencePiece-style BPE checkpoints (Llama-2, Mistral, Mixtral: normalizer Prepend + Replace
 * or pre_tokenizer Metaspace, byte_fallback, decoder Replace/ByteFallback/Fuse/Strip) load as
 * well. Their decoder's Strip (drop the first space of the whole text) is not applied: decoding
 * is per token, so a generated continuation keeps its leading space, as vLLM streams it.
 *
 * Regexes (the GPT-2 pattern of ByteLevel and the checkpoint's own Split patterns) run through
 * PCRE2 with UTF and UCP, JIT-compiled when available. The reference uses Oniguruma; the
 * patterns real checkpoints ship (GPT-2, Llama-3, Qwen2, DeepSeek) mean the same in both.
 *
 * Decoding undoes the byte-level mapping per token; text that is not valid UTF-8 becomes
 * U+FFFD by maximal subparts (the same as Rust's String::from_utf8_lossy), and the streaming
 * decoder holds back an incomplete trailing character so no chunk ever ends inside one.
 *
 * Everything is read-only after loading, so one tokenizer may encode from many threads.
 */
#define _GNU_SOURCE
#define PCRE2_CODE_UNIT_WIDTH 8
#include "loom/tokenizer.h"
#include "tok_internal.h"

#include <cJSON.h>
#include <pcre2.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOK_MAX_ID ((1 << 24) - 1) /* ids above this are rejected as corrupt */
#define TOK_MAX_DEPTH 8            /* nesting of Sequence pre-tokenizers/processors */
#define TOK_MATCH_LIMIT 10000000   /* PCRE2 backtracking bound for a hostile pattern */

/* The GPT-2 pre-tokenization pattern used by ByteLevel(use_regex=true). */
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* ---------------------------------------------------------------- byte-level alphabet */

/*
 * GPT-2's bytes_to_unicode(): printable Latin-1 bytes map to themselves, the other 68 bytes
 * to U+0100 onwards, so every byte string is a printable string. Codepoints stay < 0x144.
 */
static uint16_t byte_cp[256];
static int16_t cp_byte[0x144];
static pthread_once_t byte_table_once = PTHREAD_ONCE_INIT;

static void byte_table_init(void)
{
    for (int i = 0; i < 0x144; i++)
        cp_byte[i] = -1;
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        byte_cp[b] = printable ? (uint16_t)b : (uint16_t)(256 + n++);
        cp_byte[byte_cp[b]] = (int16_t)b;
    }
}

static void byte_tables(void)
{
    pthread_once(&byte_table_once, byte_table_init);
}

/* Appends the byte-level form of raw bytes s[0..n) to b. */
static void byte_level_map(const char *s, size_t n, loom_buf *b)
{
    for (size_t i = 0; i < n; i++) {
        unsigned cp = byte_cp[(unsigned char)s[i]];
        char u[2];
        if (cp < 0x80) {
            u[0] = (char)cp;
            buf_append(b, u, 1);
        } else {
            u[0] = (char)(0xC0 | (cp >> 6));
            u[1] = (char)(0x80 | (cp & 0x3F));
            buf_append(b, u, 2);
        }
    }
}

/* ---------------------------------------------------------------- UTF-8 */

int tok_utf8_char(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    if (c < 0x80)
        return 1;
    int need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
        need = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        return -1;
    }
    for (int i = 1; i < need; i++) {
        if ((size_t)i >= n)
            return 0;
        unsigned b = s[i];
        if (b < lo || b > hi)
            return -i;
        lo = 0x80;
        hi = 0xBF;
    }
    return need;
}

static const char REPLACEMENT_CHAR[] = "\xEF\xBF\xBD"; /* U+FFFD */

size_t tok_utf8_emit(const unsigned char *s, size_t n, bool final, loom_buf *out)
{
    size_t i = 0, run = 0; /* run: start of the pending stretch of valid characters */
    while (i < n) {
        int k = tok_utf8_char(s + i, n - i);
        if (k > 0) {
            i += (size_t)k;
            continue;
        }
        if (i > run)
            buf_append(out, s + run, i - run);
        if (k == 0) { /* a valid but incomplete character at the very end */
            if (!final)
                return n - i;
            buf_append(out, REPLACEMENT_CHAR, 3);
            return 0;
        }
        buf_append(out, REPLACEMENT_CHAR, 3);
        i += (size_t)(-k);
        run = i;
    }
    if (i > run)
        buf_append(out, s + run, i - run);
    return 0;
}

static bool utf8_valid(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        if ((unsigned char)s[i] < 0x80) {
            i++;
            continue;
        }
        int k = tok_utf8_char((const unsigned char *)s + i, n - i);
        if (k <= 0)
            return false;
        i += (size_t)k;
    }
    return true;
}

static size_t utf8_len_at(const char *s)
{
    unsigned c = (unsigned char)*s;
    return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}

/* ---------------------------------------------------------------- hash maps */

/* Token text -> id. Keys are offsets into the tokenizer's string pool. */
typedef struct strmap_slot {
    uint32_t off, len;
    int32_t id; /* -1: empty slot */
} strmap_slot;

typedef struct strmap {
    strmap_slot *slots;
    size_t mask;
} strmap;

static uint64_t str_hash(const char *s, size_t n)
{
    return loom_hash64(s, n, 0x9E3779B97F4A7C15ull);
}

static int strmap_init(strmap *m, size_t expected)
{
    size_t cap = 64;
    while (cap < expected * 2 + 16)
        cap *= 2;
    m->slots = malloc(cap * sizeof(*m->slots));
    if (!m->slots)
        return LOOM_ENOMEM;
    for (size_t i = 0; i < cap; i++)
        m->slots[i].id = -1;
    m->mask = cap - 1;
    return LOOM_OK;
}

static int32_t strmap_get(const strmap *m, const char *pool, const char *key, size_t len)
{
    if (!m->slots)
        return -1;
    for (size_t i = str_hash(key, len) & m->mask;; i = (i + 1) & m->mask) {
        const strmap_slot *s = &m->slots[i];
        if (s->id < 0)
            return -1;
        if (s->len == len && memcmp(pool + s->off, key, len) == 0)
            return s->id;
    }
}

/* Inserts or overwrites; the map is sized for its entries up front so it never fills. */
static void strmap_put(strmap *m, const char *pool, uint32_t off, uint32_t len, int32_t id)
{
    for (size_t i = str_hash(pool + off, len) & m->mask;; i = (i + 1) & m->mask) {
        strmap_slot *s = &m->slots[i];
        if (s->id < 0 || (s->len == len && memcmp(pool + s->off, pool + off, len) == 0)) {
            s->off = off;
            s->len = len;
            s->id = id;
            return;
        }
    }
}

/* (left id, right id) -> (rank, merged id). */
typedef struct pair_slot {
    uint64_t key; /* UINT64_MAX: empty */
    int32_t rank, new_id;
} pair_slot;

typedef struct pairmap {
    pair_slot *slots;
    size_t mask;
} pairmap;

static size_t pair_hash(uint64_t key)
{
    key ^= key >> 31;
    key *= 0x9E3779B97F4A7C15ull;
    return (size_t)(key ^ (key >> 29));
}

static int pairmap_init(pairmap *m, size_t expected)
{
    size_t cap = 64;
    while (cap < expected * 2 + 16)
        cap *= 2;
    m->slots = malloc(cap * sizeof(*m->slots));
    if (!m->slots)
        return LOOM_ENOMEM;
    for (size_t i = 0; i < cap; i++)
        m->slots[i].key = UINT64_MAX;
    m->mask = cap - 1;
    return LOOM_OK;
}

static uint64_t pair_key(int32_t a, int32_t b)
{
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

/* Later duplicates overwrite earlier ones, as the reference's HashMap collect does. */
static void pairmap_put(pairmap *m, int32_t a, int32_t b, int32_t rank, int32_t new_id)
{
    uint64_t key = pair_key(a, b);
    for (size_t i = pair_hash(key) & m->mask;; i = (i + 1) & m->mask) {
        pair_slot *s = &m->slots[i];
        if (s->key == UINT64_MAX || s->key == key) {
            s->key = key;
            s->rank = rank;
            s->new_id = new_id;
            return;
        }
    }
}

static const pair_slot *pairmap_get(const pairmap *m, int32_t a, int32_t b)
{
    if (!m->slots)
        return NULL;
    uint64_t key = pair_key(a, b);
    for (size_t i = pair_hash(key) & m->mask;; i = (i + 1) & m->mask) {
        const pair_slot *s = &m->slots[i];
        if (s->key == key)
            return s;
        if (s->key == UINT64_MAX)
            return NULL;
    }
}

/* ---------------------------------------------------------------- the tokenizer */

enum split_behavior {
    SPLIT_REMOVED,
    SPLIT_ISOLATED,
    SPLIT_MERGED_WITH_PREVIOUS,
    SPLIT_MERGED_WITH_NEXT,
    SPLIT_CONTIGUOUS,
};

/* One step of the (flattened) pre-tokenizer pipeline. */
typedef struct pretok {
    pcre2_code *re; /* split pattern; NULL: no split (ByteLevel use_regex=false) */
    int behavior;   /* enum split_behavior */
    bool invert;
    bool add_prefix_space; /* ByteLevel: prepend ' ' to a piece that lacks one */
    bool byte_level;       /* ByteLevel: map bytes to the GPT-2 alphabet after splitting */
    char *metaspace;       /* Metaspace: spaces become this ("\u2581") before splitting */
    int prepend_scheme;    /* Metaspace: enum prepend_scheme */
} pretok;

enum prepend_scheme { PREPEND_NEVER, PREPEND_ALWAYS, PREPEND_FIRST };

/* One normalizer step (NFC is the identity and has none). */
typedef struct normstep {
    char *prepend;  /* Prepend: this before non-empty text */
    pcre2_code *re; /* Replace: pattern (literal or regex) ... */
    char *content;  /* ... and its replacement */
} normstep;

typedef struct added_token {
    uint32_t off, len; /* content, in the pool */
    int32_t id;
    bool special, lstrip, rstrip, single_word;
} added_token;

struct tokenizer {
    int32_t n_ids; /* highest id + 1 */
    char *pool;    /* every string the tokenizer owns, NUL-separated */
    size_t pool_len;
    uint32_t *token_off, *token_len; /* (n_ids) text as in tokenizer.json; len 0 = hole */
    uint32_t *bytes_off, *bytes_len; /* (n_ids) raw bytes a token decodes to */
    uint8_t *special;                /* (n_ids) */
    strmap vocab;                    /* token text -> id (model vocab, then added tokens) */
    pairmap merges;
    int32_t small_char_id[0x180]; /* id of the single-character token for codepoints < 0x180 */
    int32_t byte_token[256];      /* byte_fallback: id of "<0xXX>", -1 if absent */
    bool ignore_merges, byte_fallback, fuse_unk;
    int32_t unk_id;

    added_token *added; /* (n_added) */
    int n_added;
    int *added_order;     /* indices into added, grouped by first byte, longest first */
    int added_start[257]; /* added_order[added_start[b] .. added_start[b+1]) start with b */

    pretok *pretok; /* (n_pretok) */
    int n_pretok;
    normstep *norm; /* (n_norm) */
    int n_norm;
    pcre2_match_context *mctx;

    int32_t *prefix, *suffix; /* post_processor: ids around the sequence when add_special */
    int n_prefix, n_suffix;

    int32_t bos_id, eos_id;
    char *bos_token, *eos_token;
    char *chat_template;
};

/* Parse state: the pool is a growable buffer until the tokenizer is complete. */
typedef struct builder {
    tokenizer *t;
    loom_buf pool;
    bool decode_byte_level;
    bool has_byte_level;
    bool decode_byte_fallback;             /* "<0xAB>" tokens decode to the byte 0xAB */
    char *replace_from[8], *replace_to[8]; /* decoder Replace / Metaspace steps, in order */
    int n_replace;
    int depth;
} builder;

static uint32_t pool_add(builder *b, const char *s, size_t n)
{
    uint32_t off = (uint32_t)b->pool.len;
    buf_append(&b->pool, s, n);
    buf_append(&b->pool, "", 1);
    return off;
}

static const char *jstr(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, k) : NULL;
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static const cJSON *jget(const cJSON *o, const char *k)
{
    return cJSON_IsObject(o) ? cJSON_GetObjectItemCaseSensitive(o, k) : NULL;
}

static bool jbool(const cJSON *o, const char *k, bool def)
{
    const cJSON *v = jget(o, k);
    return cJSON_IsBool(v) ? cJSON_IsTrue(v) : def;
}

static bool jint(const cJSON *v, int64_t lo, int64_t hi, int64_t *out)
{
    if (!cJSON_IsNumber(v))
        return false;
    double d = v->valuedouble;
    if (!(d >= (double)lo && d <= (double)hi) || d != (double)(int64_t)d)
        return false;
    *out = (int64_t)d;
    return true;
}

static int regex_compile(const char *pat, size_t len, bool literal, pcre2_code **out,
                         const char *what, loom_err *e)
{
    int code;
    PCRE2_SIZE off;
    /* PCRE2 refuses UCP together with LITERAL; a literal needs no character classes */
    uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, len, opts, &code, &off, NULL);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof(msg));
        return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: %s: bad regex at offset %zu: %s", what,
                         (size_t)off, (const char *)msg);
    }
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* no JIT: the interpreter runs it */
    *out = re;
    return LOOM_OK;
}

static int pretok_add(builder *b, const char *pattern, bool literal, int behavior, bool invert,
                      bool byte_level, bool add_prefix_space, const char *what, loom_err *e)
{
    tokenizer *t = b->t;
    pretok p = {.behavior = behavior,
                .invert = invert,
                .byte_level = byte_level,
                .add_prefix_space = add_prefix_space};
    if (pattern) {
        int rc = regex_compile(pattern, strlen(pattern), literal, &p.re, what, e);
        if (rc)
            return rc;
    }
    t->pretok = xrealloc(t->pretok, (size_t)(t->n_pretok + 1) * sizeof(*t->pretok));
    t->pretok[t->n_pretok++] = p;
    return LOOM_OK;
}

static int parse_behavior(const char *s, int *out)
{
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext",
                                  "Contiguous"};
    for (int i = 0; i < 5; i++)
        if (s && strcmp(s, names[i]) == 0) {
            *out = i;
            return 0;
        }
    return -1;
}

/* A Sequence component: each item of j[key] through parse, with a depth bound against hostile
 * nesting (the fuzz target builds such files). */
static int parse_sequence(builder *b, const cJSON *j, const char *key, const char *what,
                          int (*parse)(builder *, const cJSON *, loom_err *), loom_err *e)
{
    const cJSON *list = jget(j, key);
    if (!cJSON_IsArray(list))
        return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: Sequence %s without \"%s\"", what, key);
    if (++b->depth > TOK_MAX_DEPTH)
        return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: %s nested too deeply", what);
    const cJSON *item;
    cJSON_ArrayForEach(item, list)
    {
        int rc = parse(b, item, e);
        if (rc)
            return rc;
    }
    b->depth--;
    return LOOM_OK;
}

/* pre_tokenizer: ByteLevel, Split, Sequence, and the few others that reduce to a Split. */
static int parse_pretokenizer(builder *b, const cJSON *j, loom_err *e)
{
    if (!j || cJSON_IsNull(j))
        return LOOM_OK;
    const char *type = jstr(j, "type");
    if (!type)
        return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: pre_tokenizer without a \"type\"");
    if (strcmp(type, "Sequence") == 0) {
        return parse_sequence(b, j, "pretokenizers", "pre_tokenizer", parse_pretokenizer, e);
    }
    if (strcmp(type, "ByteLevel") == 0) {
        b->has_byte_level = true;
        bool use_regex = jbool(j, "use_regex", true);
        return pretok_add(b, use_regex ? GPT2_PATTERN : NULL, false, SPLIT_ISOLATED, false, true,
                          jbool(j, "add_prefix_space", false), "ByteLevel", e);
    }
    if (strcmp(type, "Split") == 0) {
        const cJSON *pat = jget(j, "pattern");
        const char *regex = jstr(pat, "Regex"), *literal = jstr(pat, "String");
        if (!regex && !literal)
            return loom_errf(e, LOOM_EFORMAT,
                             "tokenizer.json: Split pre_tokenizer needs pattern.Regex or "
                             "pattern.String");
        int behavior;
        const char *bname = jstr(j, "behavior");
        if (parse_behavior(bname, &behavior))
            return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: Split behavior '%s' is unknown",
                             bname ? bname : "(missing)");
        return pretok_add(b, regex ? regex : literal, !regex, behavior, jbool(j, "invert", false),
                          false, false, "Split pattern", e);
    }
    if (strcmp(type, "Metaspace") == 0) {
        const char *rep = jstr(j, "replacement");
        const char *scheme = jstr(j, "prepend_scheme");
        pretok p = {.behavior = SPLIT_MERGED_WITH_NEXT};
        p.metaspace = xstrdup(rep && *rep ? rep : "\xE2\x96\x81");
        if (scheme)
            p.prepend_scheme = strcmp(scheme, "always") == 0  ? PREPEND_ALWAYS
                               : strcmp(scheme, "first") == 0 ? PREPEND_FIRST
                                                              : PREPEND_NEVER;
        else /* older files: add_prefix_space */
            p.prepend_scheme = jbool(j, "add_prefix_space", true) ? PREPEND_ALWAYS : PREPEND_NEVER;
        if (jbool(j, "split", true)) {
            int rc = regex_compile(p.metaspace, strlen(p.metaspace), true, &p.re, "Metaspace", e);
            if (rc) {
                free(p.metaspace);
                return rc;
            }
        }
        tokenizer *t = b->t;
        t->pretok = xrealloc(t->pretok, (size_t)(t->n_pretok + 1) * sizeof(*t->pretok));
        t->pretok[t->n_pretok++] = p;
        return LOOM_OK;
    }
    if (strcmp(type, "Digits") == 0)
        return pretok_add(b, "\\p{N}", false,
                          jbool(j, "individual_digits", false) ? SPLIT_ISOLATED : SPLIT_CONTIGUOUS,
                          false, false, false, "Digits", e);
    if (strcmp(type, "Whitespace") == 0)
        return pretok_add(b, "\\w+|[^\\w\\s]+", false, SPLIT_REMOVED, true, false, false,
                          "Whitespace", e);
    if (strcmp(type, "WhitespaceSplit") == 0)
        return pretok_add(b, "\\s+", false, SPLIT_REMOVED, false, false, false, "WhitespaceSplit",
                          e);
    if (strcmp(type, "Punctuation") == 0) {
        int behavior = SPLIT_ISOLATED;
        const char *bname = jstr(j, "behavior");
        if (bname && parse_behavior(bname, &behavior))
            return loom_errf(e, LOOM_EFORMAT,
                             "tokenizer.json: Punctuation behavior '%s' is unknown", bname);
        return pretok_add(b, "[\\p{P}!-/:-@\\[-`{-~]", false, behavior, false, false, false,
                          "Punctuation", e);
    }
    return loom_errf(e, LOOM_EUNSUPPORTED,
                     "tokenizer.json: pre_tokenizer type '%s' is not supported (supported: "
                     "ByteLevel, Split, Metaspace, Sequence, Digits, Whitespace, "
                     "WhitespaceSplit, Punctuation)",
                     type);
}

static int parse_normalizer(builder *b, const cJSON *j, loom_err *e)
{
    if (!j || cJSON_IsNull(j))
        return LOOM_OK;
    const char *type = jstr(j, "type");
    tokenizer *t = b->t;
    if (type && strcmp(type, "NFC") == 0)
        return LOOM_OK; /* identity: see the comment at the top of this file */
    if (type && (strcmp(type, "Prepend") == 0 || strcmp(type, "Replace") == 0)) {
        normstep st = {0};
        if (type[0] == 'P') {
            const char *pre = jstr(j, "prepend");
            if (!pre)
                return loom_errf(e, LOOM_EFORMAT,
                                 "tokenizer.json: Prepend normalizer without "
                                 "\"prepend\"");
            st.prepend = xstrdup(pre);
        } else {
            const cJSON *pat = jget(j, "pattern");
            const char *regex = jstr(pat, "Regex"), *literal = jstr(pat, "String");
            const char *content = jstr(j, "content");
            if ((!regex && !literal) || !content)
                return loom_errf(e, LOOM_EFORMAT,
                                 "tokenizer.json: Replace normalizer needs "
                                 "pattern.String or pattern.Regex and content");
            const char *pattern = regex ? regex : literal;
            if (!*pattern)
                return loom_errf(e, LOOM_EFORMAT,
                                 "tokenizer.json: Replace normalizer with an "
                                 "empty pattern");
            int rc = regex_compile(pattern, strlen(pattern), !regex, &st.re, "Replace", e);
            if (rc)
                return rc;
            st.content = xstrdup(content);
        }
        t->norm = xrealloc(t->norm, (size_t)(t->n_norm + 1) * sizeof(*t->norm));
        t->norm[t->n_norm++] = st;
        return LOOM_OK;
    }
    if (type && strcmp(type, "Sequence") == 0) {
        return parse_sequence(b, j, "normalizers", "normalizer", parse_normalizer, e);
    }
    return loom_errf(e, LOOM_EUNSUPPORTED,
                     "tokenizer.json: normalizer '%s' is not supported (supported: null, NFC, "
                     "Prepend, Replace, Sequence)",
                     type ? type : "(no type)");
}

static int parse_decoder(builder *b, const cJSON *j, loom_err *e)
{
    if (!j || cJSON_IsNull(j))
        return LOOM_OK;
    const char *type = jstr(j, "type");
    if (type && strcmp(type, "ByteLevel") == 0) {
        b->decode_byte_level = true;
        return LOOM_OK;
    }
    if (type && (strcmp(type, "ByteFallback") == 0)) {
        b->decode_byte_fallback = true;
        return LOOM_OK;
    }
    if (type && (strcmp(type, "Fuse") == 0 || strcmp(type, "Strip") == 0))
        return LOOM_OK; /* Fuse: concatenation; Strip: see the top of this file */
    if (type && (strcmp(type, "Replace") == 0 || strcmp(type, "Metaspace") == 0)) {
        const char *from, *to = " ";
        if (type[0] == 'R') {
            from = jstr(jget(j, "pattern"), "String");
            to = jstr(j, "content");
        } else {
            from = jstr(j, "replacement");
        }
        if (!from || !*from || !to)
            return loom_errf(e, LOOM_EUNSUPPORTED,
                             "tokenizer.json: %s decoder: only a "
                             "non-empty String pattern with a content is supported",
                             type);
        if (b->n_replace == 8)
            return loom_errf(e, LOOM_EUNSUPPORTED, "tokenizer.json: too many Replace decoders");
        b->replace_from[b->n_replace] = xstrdup(from);
        b->replace_to[b->n_replace++] = xstrdup(to);
        return LOOM_OK;
    }
    if (type && strcmp(type, "Sequence") == 0) {
        return parse_sequence(b, j, "decoders", "decoder", parse_decoder, e);
    }
    return loom_errf(e, LOOM_EUNSUPPORTED,
                     "tokenizer.json: decoder '%s' is not supported (supported: null, ByteLevel, "
                     "ByteFallback, Fuse, Replace, Metaspace, Strip, Sequence)",
                     type ? type : "(no type)");
}

static void ids_push(int32_t **v, int *n, int32_t id)
{
    *v = xrealloc(*v, (size_t)(*n + 1) * sizeof(**v));
    (*v)[(*n)++] = id;
}

static int check_id(const tokenizer *t, int64_t id, const char *what, loom_err *e)
{
    if (id < 0 || id >= t->n_ids)
        return loom_errf(e, LOOM_EFORMAT,
                         "tokenizer.json: post_processor %s: id %lld is out of "
                         "range (vocab size %d)",
                         what, (long long)id, (int)t->n_ids);
    return LOOM_OK;
}

/* Appends the ids of one TemplateProcessing special token to *v. */
static int template_special(builder *b, const cJSON *specials, const char *name, int32_t **v,
                            int *n, loom_err *e)
{
    const cJSON *entry = jget(specials, name);
    const cJSON *ids = jget(entry, "ids");
    if (cJSON_IsArray(ids)) {
        const cJSON *x;
        cJSON_ArrayForEach(x, ids)
        {
            int64_t id;
            if (!jint(x, 0, TOK_MAX_ID, &id) || check_id(b->t, id, name, e))
                return loom_errf(e, LOOM_EFORMAT,
                                 "tokenizer.json: post_processor special token "
                                 "'%s' has a bad id",
                                 name);
            ids_push(v, n, (int32_t)id);
        }
        return LOOM_OK;
    }
    /* Not in special_tokens: the reference refuses this; resolve through the vocab instead. */
    int32_t id = tokenizer_token_to_id(b->t, name);
    if (id < 0)
        return loom_errf(e, LOOM_EFORMAT,
                         "tokenizer.json: post_processor special token '%s' is unknown", name);
    ids_push(v, n, id);
    return LOOM_OK;
}

/*
 * post_processor: prefix and suffix ids around one sequence. In a Sequence each later processor
 * wraps the output of the earlier ones.
 */
static int parse_post_processor(builder *b, const cJSON *j, int32_t **pre, int *n_pre,
                                int32_t **suf, int *n_suf, loom_err *e)
{
    if (!j || cJSON_IsNull(j))
        return LOOM_OK;
    const char *type = jstr(j, "type");
    if (!type)
        return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: post_processor without a \"type\"");
    if (strcmp(type, "ByteLevel") == 0)
        return LOOM_OK; /* only trims offsets */
    if (strcmp(type, "TemplateProcessing") == 0) {
        const cJSON *single = jget(j, "single"), *specials = jget(j, "special_tokens");
        if (!cJSON_IsArray(single))
            return loom_errf(e, LOOM_EFORMAT,
                             "tokenizer.json: TemplateProcessing without a \"single\" list");
        int32_t *p = NULL, *s = NULL;
        int np = 0, ns = 0, rc = LOOM_OK;
        bool seen_seq = false;
        const cJSON *item;
        cJSON_ArrayForEach(item, single)
        {
            const cJSON *sp = jget(item, "SpecialToken");
            if (sp) {
                const char *name = jstr(sp, "id");
                if (!name) {
                    rc = loom_errf(e, LOOM_EFORMAT,
                                   "tokenizer.json: TemplateProcessing SpecialToken without id");
                    break;
                }
                rc = seen_seq ? template_special(b, specials, name, &s, &ns, e)
                              : template_special(b, specials, name, &p, &np, e);
                if (rc)
                    break;
            } else if (jget(item, "Sequence")) {
                seen_seq = true;
            } else {
                rc = loom_errf(e, LOOM_EFORMAT,
                               "tokenizer.json: TemplateProcessing item is neither SpecialToken "
                               "nor Sequence");
                break;
            }
        }
        if (rc == LOOM_OK) {
            /* new prefix = p + old prefix; new suffix = old suffix + s */
            int32_t *np_ids = NULL;
            int nn = 0;
            for (int i = 0; i < np; i++)
                ids_push(&np_ids, &nn, p[i]);
            for (int i = 0; i < *n_pre; i++)
                ids_push(&np_ids, &nn, (*pre)[i]);
            free(*pre);
            *pre = np_ids;
            *n_pre = nn;
            for (int i = 0; i < ns; i++)
                ids_push(suf, n_suf, s[i]);
        }
        free(p);
        free(s);
        return rc;
    }
    if (strcmp(type, "RobertaProcessing") == 0 || strcmp(type, "BertProcessing") == 0) {
        const cJSON *cls = jget(j, "cls"), *sep = jget(j, "sep");
        int64_t cls_id, sep_id;
        if (!cJSON_IsArray(cls) || !cJSON_IsArray(sep) ||
            !jint(cJSON_GetArrayItem(cls, 1), 0, TOK_MAX_ID, &cls_id) ||
            !jint(cJSON_GetArrayItem(sep, 1), 0, TOK_MAX_ID, &sep_id))
            return loom_errf(e, LOOM_EFORMAT,
                             "tokenizer.json: %s needs cls and sep as "
                             "[token, id]",
                             type);
        int rc = check_id(b->t, cls_id, "cls", e);
        if (!rc)
            rc = check_id(b->t, sep_id, "sep", e);
        if (rc)
            return rc;
        int32_t *np_ids = NULL;
        int nn = 0;
        ids_push(&np_ids, &nn, (int32_t)cls_id);
        for (int i = 0; i < *n_pre; i++)
            ids_push(&np_ids, &nn, (*pre)[i]);
        free(*pre);
        *pre = np_ids;
        *n_pre = nn;
        ids_push(suf, n_suf, (int32_t)sep_id);
        return LOOM_OK;
    }
    if (strcmp(type, "Sequence") == 0) {
        const cJSON *list = jget(j, "processors");
        if (!cJSON_IsArray(list))
            return loom_errf(e, LOOM_EFORMAT,
                             "tokenizer.json: Sequence post_processor without \"processors\"");
        if (++b->depth > TOK_MAX_DEPTH)
            return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: post_processor nested too deeply");
        const cJSON *item;
        cJSON_ArrayForEach(item, list)
        {
            int rc = parse_post_processor(b, item, pre, n_pre, suf, n_suf, e);
            if (rc)
                return rc;
        }
        b->depth--;
        return LOOM_OK;
    }
    return loom_errf(e, LOOM_EUNSUPPORTED,
                     "tokenizer.json: post_processor '%s' is not supported (supported: "
                     "TemplateProcessing, ByteLevel, RobertaProcessing, BertProcessing, Sequence)",
                     type);
}

static int hex_digit(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                  : -1;
}

/* Appends s with every `from` replaced by `to`. */
static void replace_all(const char *s, size_t n, const char *from, const char *to, loom_buf *out)
{
    size_t fn = strlen(from), tn = strlen(to);
    const char *end = s + n;
    while (s < end) {
        const char *hit = memmem(s, (size_t)(end - s), from, fn);
        if (!hit) {
            buf_append(out, s, (size_t)(end - s));
            break;
        }
        buf_append(out, s, (size_t)(hit - s));
        buf_append(out, to, tn);
        s = hit + fn;
    }
}

/* Computes the raw bytes of every token: "<0xAB>" byte tokens (ByteFallback), the byte-level
 * mapping undone (a token with a character outside the alphabet keeps its UTF-8 bytes, as the
 * reference does), or the decoder's Replace steps ("\u2581" -> " "). */
static void compute_token_bytes(builder *b)
{
    tokenizer *t = b->t;
    loom_buf raw;
    buf_init(&raw);
    for (int32_t id = 0; id < t->n_ids; id++) {
        /* read through the pool offset each time: pool_add may move it */
        uint32_t len = t->token_len[id];
        if (len == 0) {
            t->bytes_off[id] = t->token_off[id];
            t->bytes_len[id] = 0;
            continue;
        }
        bool mapped = b->decode_byte_level;
        raw.len = 0;
        const char *tok = b->pool.data + t->token_off[id];
        if (b->decode_byte_fallback && len == 6 && memcmp(tok, "<0x", 3) == 0 && tok[5] == '>' &&
            hex_digit(tok[3]) >= 0 && hex_digit(tok[4]) >= 0) {
            char c = (char)(hex_digit(tok[3]) * 16 + hex_digit(tok[4]));
            t->bytes_off[id] = pool_add(b, &c, 1);
            t->bytes_len[id] = 1;
            continue;
        }
        if (!mapped && b->n_replace > 0) {
            loom_buf tmp;
            buf_init(&tmp);
            buf_append(&raw, tok, len);
            for (int r = 0; r < b->n_replace; r++) {
                tmp.len = 0;
                replace_all(raw.data, raw.len, b->replace_from[r], b->replace_to[r], &tmp);
                raw.len = 0;
                buf_append(&raw, tmp.data, tmp.len);
            }
            buf_free(&tmp);
            t->bytes_off[id] = pool_add(b, raw.data, raw.len);
            t->bytes_len[id] = (uint32_t)raw.len;
            continue;
        }
        if (mapped) {
            const char *s = b->pool.data + t->token_off[id];
            for (uint32_t i = 0; i < len;) {
                int k = tok_utf8_char((const unsigned char *)s + i, len - i);
                unsigned cp;
                if (k == 1) {
                    cp = (unsigned char)s[i];
                } else if (k == 2) {
                    cp = ((unsigned)(s[i] & 0x1F) << 6) | (unsigned)(s[i + 1] & 0x3F);
                } else {
                    mapped = false;
                    break;
                }
                if (cp >= 0x144 || cp_byte[cp] < 0) {
                    mapped = false;
                    break;
                }
                char c = (char)cp_byte[cp];
                buf_append(&raw, &c, 1);
                i += (uint32_t)k;
            }
        }
        if (mapped) {
            t->bytes_off[id] = pool_add(b, raw.data, raw.len);
            t->bytes_len[id] = (uint32_t)raw.len;
        } else {
            t->bytes_off[id] = t->token_off[id];
            t->bytes_len[id] = len;
        }
    }
    buf_free(&raw);
}

static int cmp_added_order(const void *a, const void *b, void *ctx)
{
    const tokenizer *t = ctx;
    const added_token *x = &t->added[*(const int *)a], *y = &t->added[*(const int *)b];
    unsigned char fx = (unsigned char)t->pool[x->off], fy = (unsigned char)t->pool[y->off];
    if (fx != fy)
        return fx < fy ? -1 : 1;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1; /* longest first */
    return *(const int *)a - *(const int *)b;
}

static int parse_added_tokens(builder *b, const cJSON *list, loom_err *e)
{
    tokenizer *t = b->t;
    if (!list || cJSON_IsNull(list))
        return LOOM_OK;
    if (!cJSON_IsArray(list))
        return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: added_tokens is not a list");
    int n = cJSON_GetArraySize(list), i = 0;
    t->added = xcalloc((size_t)n + 1, sizeof(*t->added));
    const cJSON *item;
    cJSON_ArrayForEach(item, list)
    {
        int64_t id;
        const char *content = jstr(item, "content");
        if (!jint(jget(item, "id"), 0, TOK_MAX_ID, &id))
            return loom_errf(e, LOOM_EFORMAT,
                             "tokenizer.json: added_tokens[%d]: missing or bad "
                             "\"id\"",
                             i);
        if (!content)
            return loom_errf(e, LOOM_EFORMAT,
                             "tokenizer.json: added_tokens[%d]: missing "
                             "\"content\"",
                             i);
        if (!*content) { /* an empty token would match everywhere */
            i++;
            continue;
        }
        added_token *a = &t->added[t->n_added++];
        size_t len = strlen(content);
        a->off = pool_add(b, content, len);
        a->len = (uint32_t)len;
        a->id = (int32_t)id;
        a->special = jbool(item, "special", false);
        a->lstrip = jbool(item, "lstrip", false);
        a->rstrip = jbool(item, "rstrip", false);
        a->single_word = jbool(item, "single_word", false);
        i++;
    }
    return LOOM_OK;
}

/* Vocab and merges of model.type BPE. */
static int parse_bpe(builder *b, const cJSON *model, loom_err *e)
{
    tokenizer *t = b->t;
    const char *type = jstr(model, "type");
    if (!cJSON_IsObject(model))
        return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: missing \"model\" object");
    if (type && strcmp(type, "BPE") != 0)
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "tokenizer.json: model type '%s' is not supported (only BPE)", type);
    const char *cont = jstr(model, "continuing_subword_prefix");
    const char *suffix = jstr(model, "end_of_word_suffix");
    if ((cont && *cont) || (suffix && *suffix))
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "tokenizer.json: BPE continuing_subword_prefix and "
                         "end_of_word_suffix are not supported");
    const cJSON *vocab = jget(model, "vocab"), *merges = jget(model, "merges");
    if (!cJSON_IsObject(vocab))
        return loom_errf(e, LOOM_EFORMAT,
                         "tokenizer.json: model.vocab is missing or not an "
                         "object");
    if (merges && !cJSON_IsNull(merges) && !cJSON_IsArray(merges))
        return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: model.merges is not a list");
    t->ignore_merges = jbool(model, "ignore_merges", false);
    t->byte_fallback = jbool(model, "byte_fallback", false);
    t->fuse_unk = jbool(model, "fuse_unk", false);

    /* ids: the largest of vocab and added tokens sets the size */
    int n_vocab = cJSON_GetArraySize(vocab);
    int64_t max_id = -1;
    const cJSON *v;
    cJSON_ArrayForEach(v, vocab)
    {
        int64_t id;
        if (!jint(v, 0, TOK_MAX_ID, &id))
            return loom_errf(e, LOOM_EFORMAT,
                             "tokenizer.json: model.vocab['%.60s']: id is not "
                             "an integer in [0, %d]",
                             v->string ? v->string : "", TOK_MAX_ID);
        if (id > max_id)
            max_id = id;
    }
    for (int i = 0; i < t->n_added; i++)
        if (t->added[i].id > max_id)
            max_id = t->added[i].id;
    if (max_id > (int64_t)n_vocab + t->n_added + (1 << 20))
        return loom_errf(e, LOOM_EFORMAT,
                         "tokenizer.json: id %lld is far beyond the %d vocab "
                         "entries",
                         (long long)max_id, n_vocab + t->n_added);
    t->n_ids = (int32_t)(max_id + 1);
    size_t n = (size_t)t->n_ids + 1;
    t->token_off = calloc(n, sizeof(uint32_t));
    t->token_len = calloc(n, sizeof(uint32_t));
    t->bytes_off = calloc(n, sizeof(uint32_t));
    t->bytes_len = calloc(n, sizeof(uint32_t));
    t->special = calloc(n, 1);
    if (!t->token_off || !t->token_len || !t->bytes_off || !t->bytes_len || !t->special ||
        strmap_init(&t->vocab, (size_t)n_vocab + (size_t)t->n_added))
        return loom_errf(e, LOOM_ENOMEM, "tokenizer.json: out of memory for %d ids", t->n_ids);
    uint32_t empty = pool_add(b, "", 0);
    for (int32_t id = 0; id < t->n_ids; id++)
        t->token_off[id] = empty;

    cJSON_ArrayForEach(v, vocab)
    {
        size_t len = strlen(v->string);
        int32_t id = (int32_t)v->valuedouble;
        uint32_t off = pool_add(b, v->string, len);
        if (b->pool.len > UINT32_MAX / 2)
            return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: vocab too large");
        t->token_off[id] = off;
        t->token_len[id] = (uint32_t)len;
        strmap_put(&t->vocab, b->pool.data, off, (uint32_t)len, id);
    }
    for (int i = 0; i < t->n_added; i++) {
        added_token *a = &t->added[i];
        t->token_off[a->id] = a->off;
        t->token_len[a->id] = a->len;
        t->special[a->id] = a->special;
        strmap_put(&t->vocab, b->pool.data, a->off, a->len, a->id);
    }

    t->unk_id = -1;
    const char *unk = jstr(model, "unk_token");
    if (unk) {
        t->unk_id = strmap_get(&t->vocab, b->pool.data, unk, strlen(unk));
        if (t->unk_id < 0)
            return loom_errf(e, LOOM_EFORMAT,
                             "tokenizer.json: unk_token '%.60s' is not in the "
                             "vocab",
                             unk);
    }

    int n_merges = cJSON_IsArray(merges) ? cJSON_GetArraySize(merges) : 0;
    if (pairmap_init(&t->merges, (size_t)n_merges))
        return loom_errf(e, LOOM_ENOMEM, "tokenizer.json: out of memory for %d merges", n_merges);
    loom_buf joined;
    buf_init(&joined);
    int rank = 0, rc = LOOM_OK;
    const cJSON *m, *merge_list = cJSON_IsArray(merges) ? merges : NULL;
    cJSON_ArrayForEach(m, merge_list)
    {
        const char *left, *right;
        size_t left_len, right_len;
        if (cJSON_IsString(m)) { /* "a b" */
            left = m->valuestring;
            const char *sp = strchr(left, ' ');
            if (!sp) {
                rc = loom_errf(e, LOOM_EFORMAT,
                               "tokenizer.json: model.merges[%d] '%.60s' is not "
                               "\"left right\"",
                               rank, left);
                break;
            }
            left_len = (size_t)(sp - left);
            right = sp + 1;
            right_len = strlen(right);
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 1))) { /* ["a", "b"] */
            left = cJSON_GetArrayItem(m, 0)->valuestring;
            right = cJSON_GetArrayItem(m, 1)->valuestring;
            left_len = strlen(left);
            right_len = strlen(right);
        } else {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "tokenizer.json: model.merges[%d] is neither "
                           "\"a b\" nor [\"a\", \"b\"]",
                           rank);
            break;
        }
        joined.len = 0;
        buf_append(&joined, left, left_len);
        buf_append(&joined, right, right_len);
        int32_t a = strmap_get(&t->vocab, b->pool.data, left, left_len);
        int32_t c = strmap_get(&t->vocab, b->pool.data, right, right_len);
        int32_t ab = strmap_get(&t->vocab, b->pool.data, joined.data, joined.len);
        if (a < 0 || c < 0 || ab < 0) {
            rc = loom_errf(e, LOOM_EFORMAT,
                           "tokenizer.json: model.merges[%d]: '%.60s' is not in "
                           "the vocab",
                           rank,
                           a < 0   ? left
                           : c < 0 ? right
                                   : joined.data);
            break;
        }
        pairmap_put(&t->merges, a, c, rank, ab);
        rank++;
    }
    buf_free(&joined);
    return rc;
}

/* Lookup tables that make the hot loop of encode cheap. */
static void build_fast_tables(builder *b)
{
    tokenizer *t = b->t;
    for (unsigned cp = 0; cp < 0x180; cp++) {
        char u[2];
        size_t n = 1;
        if (cp < 0x80) {
            u[0] = (char)cp;
        } else {
            u[0] = (char)(0xC0 | (cp >> 6));
            u[1] = (char)(0x80 | (cp & 0x3F));
            n = 2;
        }
        t->small_char_id[cp] = strmap_get(&t->vocab, b->pool.data, u, n);
    }
    for (int i = 0; i < 256; i++) {
        char name[8];
        snprintf(name, sizeof(name), "<0x%02X>", i);
        t->byte_token[i] = strmap_get(&t->vocab, b->pool.data, name, 6);
    }
    t->added_order = xcalloc((size_t)t->n_added + 1, sizeof(int));
    for (int i = 0; i < t->n_added; i++)
        t->added_order[i] = i;
    t->pool = b->pool.data; /* cmp_added_order reads it */
    qsort_r(t->added_order, (size_t)t->n_added, sizeof(int), cmp_added_order, t);
    int k = 0;
    for (int c = 0; c < 256; c++) {
        t->added_start[c] = k;
        while (k < t->n_added && (unsigned char)t->pool[t->added[t->added_order[k]].off] == c)
            k++;
    }
    t->added_start[256] = k;
}

static void builder_free_replace(builder *b)
{
    for (int i = 0; i < b->n_replace; i++) {
        free(b->replace_from[i]);
        free(b->replace_to[i]);
    }
    b->n_replace = 0;
}

static tokenizer *tokenizer_alloc(void)
{
    tokenizer *t = xcalloc(1, sizeof(*t));
    t->bos_id = t->eos_id = t->unk_id = -1;
    return t;
}

int tokenizer_parse(const char *json, size_t len, tokenizer **out, loom_err *e)
{
    *out = NULL;
    byte_tables();
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, len, &end, false);
    if (!root) {
        size_t at = end && end >= json && end <= json + len ? (size_t)(end - json) : 0;
        return loom_errf(e, LOOM_EFORMAT, "tokenizer.json: invalid JSON near byte %zu", at);
    }
    builder b = {.t = tokenizer_alloc()};
    buf_init(&b.pool);
    tokenizer *t = b.t;
    int rc;
    if (!cJSON_IsObject(root)) {
        rc = loom_errf(e, LOOM_EFORMAT, "tokenizer.json: top level is not an object");
        goto fail;
    }
    rc = parse_added_tokens(&b, jget(root, "added_tokens"), e);
    if (!rc)
        rc = parse_bpe(&b, jget(root, "model"), e);
    if (!rc)
        rc = parse_normalizer(&b, jget(root, "normalizer"), e);
    if (!rc)
        rc = parse_pretokenizer(&b, jget(root, "pre_tokenizer"), e);
    if (!rc)
        rc = parse_decoder(&b, jget(root, "decoder"), e);
    if (!rc) {
        t->pool = b.pool.data; /* tokenizer_token_to_id reads the pool */
        rc = parse_post_processor(&b, jget(root, "post_processor"), &t->prefix, &t->n_prefix,
                                  &t->suffix, &t->n_suffix, e);
    }
    if (rc)
        goto fail;
    if (b.has_byte_level)
        b.decode_byte_level = true;
    compute_token_bytes(&b);
    builder_free_replace(&b);
    build_fast_tables(&b);
    t->pool = b.pool.data;
    t->pool_len = b.pool.len;
    t->mctx = pcre2_match_context_create(NULL);
    if (t->mctx)
        pcre2_set_match_limit(t->mctx, TOK_MATCH_LIMIT);
    cJSON_Delete(root);
    *out = t;
    return LOOM_OK;
fail:
    builder_free_replace(&b);
    t->pool = b.pool.data;
    tokenizer_free(t);
    cJSON_Delete(root);
    return rc;
}

void tokenizer_free(tokenizer *t)
{
    if (!t)
        return;
    free(t->pool);
    free(t->token_off);
    free(t->token_len);
    free(t->bytes_off);
    free(t->bytes_len);
    free(t->special);
    free(t->vocab.slots);
    free(t->merges.slots);
    free(t->added);
    free(t->added_order);
    for (int i = 0; i < t->n_pretok; i++) {
        pcre2_code_free(t->pretok[i].re);
        free(t->pretok[i].metaspace);
    }
    free(t->pretok);
    for (int i = 0; i < t->n_norm; i++) {
        free(t->norm[i].prepend);
        pcre2_code_free(t->norm[i].re);
        free(t->norm[i].content);
    }
    free(t->norm);
    pcre2_match_context_free(t->mctx);
    free(t->prefix);
    free(t->suffix);
    free(t->bos_token);
    free(t->eos_token);
    free(t->chat_template);
    free(t);
}

/* ---------------------------------------------------------------- synthetic byte tokenizer */

static const char CHATML_TEMPLATE[] =
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

tokenizer *tokenizer_create_bytes(int vocab_size)
{
    if (vocab_size < 259) {
        LOG_ERROR("tokenizer_create_bytes: vocab_size %d < 259 (3 special + 256 byte tokens)",
                  vocab_size);
        return NULL;
    }
    byte_tables();
    builder b = {.t = tokenizer_alloc(), .decode_byte_level = true};
    buf_init(&b.pool);
    tokenizer *t = b.t;
    static const char *specials[3] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    t->n_ids = vocab_size;
    size_t n = (size_t)vocab_size + 1;
    t->token_off = xcalloc(n, sizeof(uint32_t));
    t->token_len = xcalloc(n, sizeof(uint32_t));
    t->bytes_off = xcalloc(n, sizeof(uint32_t));
    t->bytes_len = xcalloc(n, sizeof(uint32_t));
    t->special = xcalloc(n, 1);
    if (strmap_init(&t->vocab, n) || pairmap_init(&t->merges, 0)) {
        t->pool = b.pool.data;
        tokenizer_free(t);
        return NULL;
    }
    t->added = xcalloc(3, sizeof(*t->added));
    loom_buf tmp;
    buf_init(&tmp);
    for (int32_t id = 0; id < vocab_size; id++) {
        tmp.len = 0;
        if (id < 3) {
            buf_puts(&tmp, specials[id]);
        } else if (id < 259) {
            char c = (char)(id - 3);
            byte_level_map(&c, 1, &tmp);
        } else {
            char piece[32];
            int k = snprintf(piece, sizeof(piece), " t%d", (int)id);
            byte_level_map(piece, (size_t)k, &tmp);
        }
        uint32_t off = pool_add(&b, tmp.data, tmp.len);
        t->token_off[id] = off;
        t->token_len[id] = (uint32_t)tmp.len;
        strmap_put(&t->vocab, b.pool.data, off, (uint32_t)tmp.len, id);
        if (id < 3) {
            t->special[id] = 1;
            t->added[t->n_added++] =
                (added_token){.off = off, .len = (uint32_t)tmp.len, .id = id, .special = true};
        }
    }
    buf_free(&tmp);
    pretok p = {.behavior = SPLIT_ISOLATED, .byte_level = true};
    t->pretok = xmalloc(sizeof(pretok));
    t->pretok[0] = p;
    t->n_pretok = 1;
    compute_token_bytes(&b);
    build_fast_tables(&b);
    t->pool = b.pool.data;
    t->pool_len = b.pool.len;
    t->eos_id = 2;
    t->eos_token = xstrdup(specials[2]);
    t->chat_template = xstrdup(CHATML_TEMPLATE);
    return t;
}

/* ---------------------------------------------------------------- accessors */

int tokenizer_vocab_size(const tokenizer *t)
{
    return t->n_ids;
}

int32_t tokenizer_token_to_id(const tokenizer *t, const char *token)
{
    if (!token)
        return -1;
    return strmap_get(&t->vocab, t->pool, token, strlen(token));
}

const char *tokenizer_id_to_bytes(const tokenizer *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_ids) {
        if (len)
            *len = 0;
        return NULL;
    }
    if (len)
        *len = t->bytes_len[id];
    return t->pool + t->bytes_off[id];
}

const char *tokenizer_id_to_token(const tokenizer *t, int32_t id)
{
    if (id < 0 || id >= t->n_ids)
        return NULL;
    return t->pool + t->token_off[id];
}

bool tokenizer_is_special(const tokenizer *t, int32_t id)
{
    return id >= 0 && id < t->n_ids && t->special[id];
}

int32_t tokenizer_bos_id(const tokenizer *t)
{
    return t->bos_id;
}

int32_t tokenizer_eos_id(const tokenizer *t)
{
    return t->eos_id;
}

const char *tokenizer_bos_token(const tokenizer *t)
{
    return t->bos_token;
}

const char *tokenizer_eos_token(const tokenizer *t)
{
    return t->eos_token;
}

const char *tokenizer_chat_template(const tokenizer *t)
{
    return t->chat_template;
}

void tok_set_special_tokens(tokenizer *t, const char *bos, const char *eos)
{
    if (bos) {
        free(t->bos_token);
        t->bos_token = xstrdup(bos);
        t->bos_id = tokenizer_token_to_id(t, bos);
    }
    if (eos) {
        free(t->eos_token);
        t->eos_token = xstrdup(eos);
        t->eos_id = tokenizer_token_to_id(t, eos);
    }
}

void tok_set_chat_template(tokenizer *t, const char *tmpl)
{
    free(t->chat_template);
    t->chat_template = tmpl ? xstrdup(tmpl) : NULL;
}

int tokenizer_apply_chat_template(const tokenizer *t, const chat_message *msgs, int n_msgs,
                                  bool add_generation_prompt, char **out, loom_err *e)
{
    *out = NULL;
    if (!t->chat_template)
        return loom_errf(e, LOOM_ENOTFOUND, "the tokenizer has no chat template");
    return chat_template_render(t->chat_template, msgs, n_msgs, add_generation_prompt, t->bos_token,
                                t->eos_token, out, e);
}

/* ---------------------------------------------------------------- encoding */

typedef struct span {
    size_t off, len; /* into work.text */
} span;

typedef struct seg {
    size_t start, end;
    bool match;
} seg;

typedef struct heap_item {
    int32_t rank, pos, new_id;
} heap_item;

/* Scratch space of one encode call. */
typedef struct work {
    loom_buf text; /* piece text; spans hold offsets because it may move */
    span *pieces, *next;
    size_t n_pieces, n_next, cap_pieces, cap_next;
    seg *segs;
    size_t n_segs, cap_segs;
    int32_t *sym, *prev, *nxt; /* BPE symbols of one piece, as a linked list */
    size_t cap_sym;
    heap_item *heap;
    size_t n_heap, cap_heap;
    pcre2_match_data *md;
    int32_t *ids;
    size_t n_ids, cap_ids;
    loom_buf scratch;
    bool at_start; /* the current text starts at offset 0 of the input (Metaspace "first") */
} work;

/* Appends the text span src of w->text to its end (a copy: the buffer may move). */
static span text_copy(work *w, const char *prefix, span src)
{
    w->scratch.len = 0;
    if (prefix)
        buf_puts(&w->scratch, prefix);
    buf_append(&w->scratch, w->text.data + src.off, src.len);
    span out = {w->text.len, w->scratch.len};
    buf_append(&w->text, w->scratch.data, w->scratch.len);
    return out;
}

static void push_id(work *w, int32_t id)
{
    if (w->n_ids == w->cap_ids) {
        w->cap_ids = w->cap_ids ? w->cap_ids * 2 : 64;
        w->ids = xrealloc(w->ids, w->cap_ids * sizeof(*w->ids));
    }
    w->ids[w->n_ids++] = id;
}

static void push_next(work *w, size_t off, size_t len)
{
    if (len == 0)
        return;
    if (w->n_next == w->cap_next) {
        w->cap_next = w->cap_next ? w->cap_next * 2 : 64;
        w->next = xrealloc(w->next, w->cap_next * sizeof(*w->next));
    }
    w->next[w->n_next++] = (span){off, len};
}

static void push_seg(work *w, size_t start, size_t end, bool match)
{
    if (w->n_segs == w->cap_segs) {
        w->cap_segs = w->cap_segs ? w->cap_segs * 2 : 64;
        w->segs = xrealloc(w->segs, w->cap_segs * sizeof(*w->segs));
    }
    w->segs[w->n_segs++] = (seg){start, end, match};
}

/* The alternating match / non-match segments of s[0..n), as the reference's find_matches. */
static int regex_segments(const tokenizer *t, work *w, const pcre2_code *re, const char *s,
                          size_t n, loom_err *e)
{
    w->n_segs = 0;
    size_t prev = 0, start = 0;
    while (start <= n) {
        int rc = pcre2_match(re, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK, w->md, t->mctx);
        if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
            rc = pcre2_match(re, (PCRE2_SPTR)s, n, start, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, w->md,
                             t->mctx);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof(msg));
            return loom_errf(e, LOOM_EINVAL, "tokenizer: pre-tokenizer regex failed: %s",
                             (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(w->md);
        size_t ms = ov[0], me = ov[1];
        if (ms < prev)
            ms = prev; /* \K tricks; never for real patterns */
        if (me < ms)
            me = ms;
        if (me > n)
            me = n;
        if (ms > prev)
            push_seg(w, prev, ms, false);
        push_seg(w, ms, me, true);
        prev = me;
        if (me == ms) {
            if (me >= n)
                break;
            start = me + utf8_len_at(s + me);
        } else {
            start = me;
        }
    }
    if (prev < n)
        push_seg(w, prev, n, false);
    return LOOM_OK;
}

/* Cuts the piece at text offset base into w->next following the Split behaviour. */
static void apply_behavior(work *w, const pretok *p, size_t base)
{
    seg *sg = w->segs;
    size_t n = w->n_segs;
    if (p->invert)
        for (size_t i = 0; i < n; i++)
            sg[i].match = !sg[i].match;
    switch (p->behavior) {
    case SPLIT_REMOVED:
        for (size_t i = 0; i < n; i++)
            if (!sg[i].match)
                push_next(w, base + sg[i].start, sg[i].end - sg[i].start);
        break;
    case SPLIT_ISOLATED:
        for (size_t i = 0; i < n; i++)
            push_next(w, base + sg[i].start, sg[i].end - sg[i].start);
        break;
    case SPLIT_MERGED_WITH_PREVIOUS:
    case SPLIT_CONTIGUOUS: {
        /* merge a match into the segment before it (Contiguous: any run of equal kinds) */
        size_t out = 0;
        bool prev_match = false;
        for (size_t i = 0; i < n; i++) {
            bool join = p->behavior == SPLIT_CONTIGUOUS ? sg[i].match == prev_match
                                                        : sg[i].match && !prev_match;
            if (join && out > 0)
                sg[out - 1].end = sg[i].end;
            else
                sg[out++] = sg[i];
            prev_match = sg[i].match;
        }
        for (size_t i = 0; i < out; i++)
            push_next(w, base + sg[i].start, sg[i].end - sg[i].start);
        break;
    }
    case SPLIT_MERGED_WITH_NEXT: {
        /* walk backwards: a match joins the segment after it */
        size_t out = n; /* sg[out..n) holds the result, built from the end */
        bool prev_match = false;
        for (size_t i = n; i-- > 0;) {
            bool join = sg[i].match && !prev_match;
            if (join && out < n)
                sg[out].start = sg[i].start;
            else
                sg[--out] = sg[i];
            prev_match = sg[i].match;
        }
        for (size_t i = out; i < n; i++)
            push_next(w, base + sg[i].start, sg[i].end - sg[i].start);
        break;
    }
    }
}

static int apply_pretok(const tokenizer *t, work *w, const pretok *p, loom_err *e)
{
    w->n_next = 0;
    for (size_t i = 0; i < w->n_pieces; i++) {
        span sp = w->pieces[i];
        if (p->add_prefix_space && w->text.data[sp.off] != ' ')
            sp = text_copy(w, " ", sp);
        if (p->metaspace) { /* spaces become U+2581; maybe one more in front */
            const char *ms = p->metaspace;
            size_t ms_len = strlen(ms);
            loom_buf tmp;
            buf_init(&tmp);
            replace_all(w->text.data + sp.off, sp.len, " ", ms, &tmp);
            bool lead = tmp.len >= ms_len && memcmp(tmp.data, ms, ms_len) == 0;
            bool prepend = !lead && (p->prepend_scheme == PREPEND_ALWAYS ||
                                     (p->prepend_scheme == PREPEND_FIRST && w->at_start && i == 0));
            sp.off = w->text.len;
            if (prepend)
                buf_append(&w->text, ms, ms_len);
            buf_append(&w->text, tmp.data, tmp.len);
            sp.len = w->text.len - sp.off;
            buf_free(&tmp);
        }
        size_t first = w->n_next;
        if (p->re) {
            int rc = regex_segments(t, w, p->re, w->text.data + sp.off, sp.len, e);
            if (rc)
                return rc;
            apply_behavior(w, p, sp.off);
        } else {
            push_next(w, sp.off, sp.len);
        }
        if (p->byte_level) {
            for (size_t k = first; k < w->n_next; k++) {
                size_t off = w->text.len;
                /* copy first: the source lives in the buffer that grows */
                span src = w->next[k];
                char small[256];
                char *tmp = src.len <= sizeof(small) ? small : xmalloc(src.len);
                memcpy(tmp, w->text.data + src.off, src.len);
                byte_level_map(tmp, src.len, &w->text);
                if (tmp != small)
                    free(tmp);
                w->next[k] = (span){off, w->text.len - off};
            }
        }
    }
    span *tmp = w->pieces;
    size_t cap = w->cap_pieces;
    w->pieces = w->next;
    w->n_pieces = w->n_next;
    w->cap_pieces = w->cap_next;
    w->next = tmp;
    w->cap_next = cap;
    w->n_next = 0;
    return LOOM_OK;
}

static bool heap_less(const heap_item *a, const heap_item *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(work *w, heap_item it)
{
    if (w->n_heap == w->cap_heap) {
        w->cap_heap = w->cap_heap ? w->cap_heap * 2 : 64;
        w->heap = xrealloc(w->heap, w->cap_heap * sizeof(*w->heap));
    }
    size_t i = w->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_less(&it, &w->heap[parent]))
            break;
        w->heap[i] = w->heap[parent];
        i = parent;
    }
    w->heap[i] = it;
}

static heap_item heap_pop(work *w)
{
    heap_item top = w->heap[0], last = w->heap[--w->n_heap];
    size_t i = 0, n = w->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && heap_less(&w->heap[c + 1], &w->heap[c]))
            c++;
        if (!heap_less(&w->heap[c], &last))
            break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n)
        w->heap[i] = last;
    return top;
}

static void try_pair(const tokenizer *t, work *w, int32_t pos)
{
    int32_t right = w->nxt[pos];
    if (right < 0)
        return;
    const pair_slot *m = pairmap_get(&t->merges, w->sym[pos], w->sym[right]);
    if (m)
        heap_push(w, (heap_item){m->rank, pos, m->new_id});
}

static int32_t char_id(const tokenizer *t, const char *s, size_t k)
{
    if (k == 1)
        return t->small_char_id[(unsigned char)s[0]];
    if (k == 2) {
        unsigned cp = ((unsigned)(s[0] & 0x1F) << 6) | (unsigned)(s[1] & 0x3F);
        if (cp < 0x180)
            return t->small_char_id[cp];
    }
    return strmap_get(&t->vocab, t->pool, s, k);
}

/*
 * BPE of one piece: start from its characters, then repeatedly merge the adjacent pair of
 * lowest rank (leftmost on ties) through a priority queue, as the reference's Word::merge_all.
 * O(n log n) in the piece length, so a long run of spaces stays cheap.
 */
static void bpe_piece(const tokenizer *t, work *w, const char *s, size_t n)
{
    if (t->ignore_merges) {
        int32_t id = strmap_get(&t->vocab, t->pool, s, n);
        if (id >= 0) {
            push_id(w, id);
            return;
        }
    }
    if (n + 1 > w->cap_sym) {
        w->cap_sym = n + 64;
        w->sym = xrealloc(w->sym, w->cap_sym * sizeof(int32_t));
        w->prev = xrealloc(w->prev, w->cap_sym * sizeof(int32_t));
        w->nxt = xrealloc(w->nxt, w->cap_sym * sizeof(int32_t));
    }
    int32_t ns = 0;
    bool last_unk = false;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_len_at(s + i);
        if (k > n - i)
            k = n - i;
        int32_t id = char_id(t, s + i, k);
        if (id >= 0) {
            w->sym[ns++] = id;
            last_unk = false;
        } else if (t->byte_fallback) {
            bool all = true;
            for (size_t j = 0; j < k; j++)
                all = all && t->byte_token[(unsigned char)s[i + j]] >= 0;
            if (all) {
                for (size_t j = 0; j < k; j++)
                    w->sym[ns++] = t->byte_token[(unsigned char)s[i + j]];
                last_unk = false;
            } else if (t->unk_id >= 0 && !(t->fuse_unk && last_unk)) {
                w->sym[ns++] = t->unk_id;
                last_unk = true;
            }
        } else if (t->unk_id >= 0) {
            if (!(t->fuse_unk && last_unk))
                w->sym[ns++] = t->unk_id;
            last_unk = true;
        }
        /* else: a character outside the vocab is dropped, as the reference does */
        i += k;
    }
    for (int32_t i = 0; i < ns; i++) {
        w->prev[i] = i - 1;
        w->nxt[i] = i + 1 < ns ? i + 1 : -1;
    }
    w->n_heap = 0;
    for (int32_t i = 0; i + 1 < ns; i++)
        try_pair(t, w, i);
    while (w->n_heap > 0) {
        heap_item top = heap_pop(w);
        int32_t pos = top.pos;
        if (w->sym[pos] < 0) /* merged away */
            continue;
        int32_t right = w->nxt[pos];
        if (right < 0)
            continue;
        const pair_slot *m = pairmap_get(&t->merges, w->sym[pos], w->sym[right]);
        if (!m || m->new_id != top.new_id) /* stale entry */
            continue;
        w->sym[pos] = top.new_id;
        w->sym[right] = -1;
        w->nxt[pos] = w->nxt[right];
        if (w->nxt[pos] >= 0)
            w->prev[w->nxt[pos]] = pos;
        if (w->prev[pos] >= 0)
            try_pair(t, w, w->prev[pos]);
        try_pair(t, w, pos);
    }
    for (int32_t i = 0; i >= 0 && i < ns; i = w->nxt[i])
        push_id(w, w->sym[i]);
}

/* One normalizer step over the whole text span; returns the new span. */
static int normalize(const tokenizer *t, work *w, const normstep *st, span *sp, loom_err *e)
{
    if (st->prepend) {
        if (sp->len > 0)
            *sp = text_copy(w, st->prepend, *sp);
        return LOOM_OK;
    }
    int rc = regex_segments(t, w, st->re, w->text.data + sp->off, sp->len, e);
    if (rc)
        return rc;
    loom_buf out;
    buf_init(&out);
    for (size_t i = 0; i < w->n_segs; i++) {
        if (w->segs[i].match)
            buf_puts(&out, st->content);
        else
            buf_append(&out, w->text.data + sp->off + w->segs[i].start,
                       w->segs[i].end - w->segs[i].start);
    }
    sp->off = w->text.len;
    sp->len = out.len;
    buf_append(&w->text, out.data, out.len);
    buf_free(&out);
    return LOOM_OK;
}

/* Normalizer, pre-tokenizer and BPE over one stretch of text between added tokens. */
static int encode_text(const tokenizer *t, work *w, const char *s, size_t n, bool at_start,
                       loom_err *e)
{
    if (n == 0)
        return LOOM_OK;
    w->text.len = 0;
    buf_append(&w->text, s, n);
    span whole = {0, n};
    for (int i = 0; i < t->n_norm; i++) {
        int rc = normalize(t, w, &t->norm[i], &whole, e);
        if (rc)
            return rc;
    }
    if (whole.len == 0)
        return LOOM_OK;
    w->at_start = at_start;
    w->n_pieces = 0;
    if (w->cap_pieces == 0) {
        w->cap_pieces = 64;
        w->pieces = xmalloc(w->cap_pieces * sizeof(*w->pieces));
    }
    w->pieces[w->n_pieces++] = whole;
    for (int i = 0; i < t->n_pretok; i++) {
        int rc = apply_pretok(t, w, &t->pretok[i], e);
        if (rc)
            return rc;
    }
    for (size_t i = 0; i < w->n_pieces; i++)
        bpe_piece(t, w, w->text.data + w->pieces[i].off, w->pieces[i].len);
    return LOOM_OK;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static bool is_word_byte(char c)
{
    unsigned char u = (unsigned char)c;
    return u >= 0x80 || u == '_' || (u >= '0' && u <= '9') ||
           ((u | 0x20) >= 'a' && (u | 0x20) <= 'z');
}

/* Longest added token starting at s[pos], or NULL. */
static const added_token *match_added(const tokenizer *t, const char *s, size_t n, size_t pos)
{
    unsigned char c = (unsigned char)s[pos];
    for (int k = t->added_start[c]; k < t->added_start[c + 1]; k++) {
        const added_token *a = &t->added[t->added_order[k]];
        if (a->len > n - pos || memcmp(s + pos, t->pool + a->off, a->len) != 0)
            continue;
        if (a->single_word && ((pos > 0 && is_word_byte(s[pos - 1])) ||
                               (pos + a->len < n && is_word_byte(s[pos + a->len]))))
            continue;
        return a;
    }
    return NULL;
}

int tokenizer_encode(const tokenizer *t, const char *text, size_t len, bool add_special,
                     int32_t **ids, int *n_ids, loom_err *e)
{
    *ids = NULL;
    *n_ids = 0;
    work w;
    memset(&w, 0, sizeof(w));
    buf_init(&w.text);
    loom_buf clean;
    buf_init(&clean);
    int rc = LOOM_OK;
    if (len > INT32_MAX / 2)
        return loom_errf(e, LOOM_ETOOLONG, "tokenizer: text of %zu bytes is too long", len);
    if (!text) {
        text = "";
        len = 0;
    }
    if (!utf8_valid(text, len)) {
        tok_utf8_emit((const unsigned char *)text, len, true, &clean);
        text = clean.data;
        len = clean.len;
    }
    w.md = pcre2_match_data_create(1, NULL);
    if (!w.md) {
        rc = loom_errf(e, LOOM_ENOMEM, "tokenizer: out of memory");
        goto done;
    }
    if (add_special)
        for (int i = 0; i < t->n_prefix; i++)
            push_id(&w, t->prefix[i]);
    size_t start = 0, pos = 0;
    while (pos < len) {
        const added_token *a =
            t->added_start[(unsigned char)text[pos] + 1] > t->added_start[(unsigned char)text[pos]]
                ? match_added(t, text, len, pos)
                : NULL;
        if (!a) {
            pos++;
            continue;
        }
        size_t ms = pos, me = pos + a->len;
        if (a->lstrip)
            while (ms > start && is_space(text[ms - 1]))
                ms--;
        if (a->rstrip)
            while (me < len && is_space(text[me]))
                me++;
        rc = encode_text(t, &w, text + start, ms - start, start == 0, e);
        if (rc)
            goto done;
        push_id(&w, a->id);
        start = pos = me;
    }
    rc = encode_text(t, &w, text + start, len - start, start == 0, e);
    if (rc)
        goto done;
    if (add_special)
        for (int i = 0; i < t->n_suffix; i++)
            push_id(&w, t->suffix[i]);
    if (w.n_ids > INT32_MAX) {
        rc = loom_errf(e, LOOM_ETOOLONG, "tokenizer: too many tokens");
        goto done;
    }
    *ids = w.ids;
    *n_ids = (int)w.n_ids;
    w.ids = NULL;
    if (!*ids)
        *ids = xmalloc(sizeof(int32_t)); /* callers may free() it either way */
done:
    buf_free(&w.text);
    buf_free(&w.scratch);
    buf_free(&clean);
    free(w.pieces);
    free(w.next);
    free(w.segs);
    free(w.sym);
    free(w.prev);
    free(w.nxt);
    free(w.heap);
    free(w.ids);
    pcre2_match_data_free(w.md);
    return rc;
}

/* ---------------------------------------------------------------- decoding */

char *tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, bool skip_special)
{
    loom_buf raw, out;
    buf_init(&raw);
    buf_init(&out);
    for (int i = 0; i < n; i++) {
        if (skip_special && tokenizer_is_special(t, ids[i]))
            continue;
        size_t len;
        const char *b = tokenizer_id_to_bytes(t, ids[i], &len);
        if (b)
            buf_append(&raw, b, len);
    }
    tok_utf8_emit((const unsigned char *)raw.data, raw.len, true, &out);
    buf_free(&raw);
    return buf_detach(&out);
}

void detok_init(detok_state *s)
{
    memset(s, 0, sizeof(*s));
}

void detok_push(const tokenizer *t, detok_state *s, int32_t id, bool skip_special, loom_buf *out)
{
    if (skip_special && tokenizer_is_special(t, id))
        return;
    size_t len;
    const char *b = tokenizer_id_to_bytes(t, id, &len);
    if (!b || len == 0)
        return;
    unsigned char small[64];
    size_t total = (size_t)s->n_pending + len;
    unsigned char *p = total <= sizeof(small) ? small : xmalloc(total);
    memcpy(p, s->pending, (size_t)s->n_pending);
    memcpy(p + s->n_pending, b, len);
    size_t held = tok_utf8_emit(p, total, false, out);
    memcpy(s->pending, p + total - held, held); /* held <= 3 */
    s->n_pending = (int)held;
    if (p != small)
        free(p);
}

void detok_flush(detok_state *s, loom_buf *out)
{
    if (s->n_pending > 0)
        tok_utf8_emit((const unsigned char *)s->pending, (size_t)s->n_pending, true, out);
    s->n_pending = 0;
}
