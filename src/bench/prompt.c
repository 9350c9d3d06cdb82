/*
 * Prompts of an exact token count.
 *
 * Token-id prompts are exact by construction. Text prompts are made of words that are one
 * token each for the target tokenizer: " word" pieces (one space, then ASCII letters). The
 * byte-level pre-tokenizers in use (GPT-2's regex, Llama-3's, Qwen's) split text before every
 * " word", so BPE never merges across two such words and n words are n tokens; the server adds
 * its special tokens (a BOS) on top, which the prompter knows as n_special.
 *
 * Shared prefixes (Mooncake hash ids): the tokens of a 512-token block are drawn from a
 * generator seeded by (seed, hash id) alone, so every request naming the same leading hash ids
 * starts with the same tokens. The rest of a prompt is seeded by (seed, salt).
 */
#include "loom/bench.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#define MIN_WORDS 16
#define MAX_WORDS 8192
#define MAX_WORD_BYTES 24

struct bench_prompter {
    bool text;
    int32_t id_lo, id_hi; /* token ids */
    char **words;         /* (n_words) " word", text mode */
    size_t *word_len;
    int n_words;
    int n_special;
};

bench_prompter *bench_prompter_ids(int32_t id_lo, int32_t id_hi)
{
    bench_prompter *p = xcalloc(1, sizeof(*p));
    if (id_lo < 0)
        id_lo = 0;
    if (id_hi <= id_lo)
        id_hi = id_lo + 1;
    p->id_lo = id_lo;
    p->id_hi = id_hi;
    return p;
}

void bench_prompter_free(bench_prompter *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->n_words; i++)
        free(p->words[i]);
    free(p->words);
    free(p->word_len);
    free(p);
}

bool bench_prompter_is_text(const bench_prompter *p)
{
    return p->text;
}

int bench_prompter_n_special(const bench_prompter *p)
{
    return p->n_special;
}

/* " " followed by 1..MAX_WORD_BYTES-2 ASCII letters. */
static bool is_plain_word(const char *s, size_t n)
{
    if (n < 2 || n >= MAX_WORD_BYTES - 1 || s[0] != ' ')
        return false;
    for (size_t i = 1; i < n; i++)
        if (!isalpha((unsigned char)s[i]) || (unsigned char)s[i] >= 0x80)
            return false;
    return true;
}

static void add_word(bench_prompter *p, const char *s, size_t n)
{
    p->words = xrealloc(p->words, (size_t)(p->n_words + 1) * sizeof(*p->words));
    p->word_len = xrealloc(p->word_len, (size_t)(p->n_words + 1) * sizeof(*p->word_len));
    p->words[p->n_words] = xstrndup(s, n);
    p->word_len[p->n_words] = n;
    p->n_words++;
}

int bench_prompter_from_words(const char *const *words, int n_words, int n_special,
                              bench_prompter **out, loom_err *e)
{
    bench_prompter *p = xcalloc(1, sizeof(*p));
    p->text = true;
    p->n_special = n_special > 0 ? n_special : 0;
    for (int i = 0; i < n_words && p->n_words < MAX_WORDS; i++)
        if (words[i] && is_plain_word(words[i], strlen(words[i])))
            add_word(p, words[i], strlen(words[i]));
    if (p->n_words < MIN_WORDS) {
        int have = p->n_words;
        bench_prompter_free(p);
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "only %d one-token words (want %d) for text "
                         "prompts",
                         have, MIN_WORDS);
    }
    *out = p;
    return 0;
}

int bench_prompter_from_tokenizer(const tokenizer *tok, bench_prompter **out, loom_err *e)
{
    bench_prompter *p = xcalloc(1, sizeof(*p));
    p->text = true;
    int vocab = tokenizer_vocab_size(tok);
    loom_err le;
    for (int32_t id = 0; id < vocab && p->n_words < MAX_WORDS; id++) {
        if (tokenizer_is_special(tok, id))
            continue;
        size_t n = 0;
        const char *bytes = tokenizer_id_to_bytes(tok, id, &n);
        if (!bytes || !is_plain_word(bytes, n))
            continue;
        /* the piece must encode back to itself alone */
        int32_t *ids = NULL;
        int n_ids = 0;
        if (tokenizer_encode(tok, bytes, n, false, &ids, &n_ids, &le) == 0 && n_ids == 1 &&
            ids[0] == id)
            add_word(p, bytes, n);
        free(ids);
    }
    if (p->n_words < MIN_WORDS) {
        int have = p->n_words;
        bench_prompter_free(p);
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "the tokenizer has only %d single-token words "
                         "(want %d); use token-id prompts",
                         have, MIN_WORDS);
    }
    /* what encode adds around a prompt (a BOS, an EOS) */
    int32_t *ids = NULL;
    int with = 0;
    if (tokenizer_encode(tok, p->words[0], p->word_len[0], true, &ids, &with, &le) != 0) {
        bench_prompter_free(p);
        return loom_errf(e, LOOM_EINVAL, "cannot encode with the tokenizer: %s", le.msg);
    }
    free(ids);
    p->n_special = with > 1 ? with - 1 : 0;
    *out = p;
    return 0;
}

void bench_prompter_set_special(bench_prompter *p, int n_special)
{
    p->n_special = n_special > 0 ? n_special : 0;
}

/* Tokens of content inside a one-message chat rendered by tok's template, or < 0. */
static int chat_tokens(const tokenizer *tok, const char *content, loom_err *e)
{
    chat_message m = {"user", content};
    char *text = NULL;
    int rc = tokenizer_apply_chat_template(tok, &m, 1, true, &text, e);
    if (rc != 0)
        return rc;
    int32_t *ids = NULL;
    int n = 0;
    rc = tokenizer_encode(tok, text, strlen(text), false, &ids, &n, e);
    free(text);
    free(ids);
    return rc != 0 ? rc : n;
}

int bench_chat_overhead(const bench_prompter *p, const tokenizer *tok, int *n_special, loom_err *e)
{
    if (!p->text || p->n_words < 2)
        return loom_errf(e, LOOM_EUNSUPPORTED, "chat prompts need text prompts");
    /* two contents of 2 and 7 words must show the same overhead */
    loom_buf a, b;
    buf_init(&a);
    buf_init(&b);
    for (int i = 0; i < 7; i++) {
        const char *w = p->words[i % p->n_words];
        if (i < 2)
            buf_puts(&a, w);
        buf_puts(&b, w);
    }
    int na = chat_tokens(tok, a.data, e);
    int nb = na >= 0 ? chat_tokens(tok, b.data, e) : na;
    buf_free(&a);
    buf_free(&b);
    if (na < 0 || nb < 0)
        return na < 0 ? na : nb;
    if (nb - na != 5)
        return loom_errf(e, LOOM_EUNSUPPORTED,
                         "the chat template changes how the content "
                         "tokenizes; chat prompt lengths are approximate");
    *n_special = na - 2;
    return 0;
}

/* Seed of the generator for one 512-token block or for a request's own tokens. */
static uint64_t mix_seed(uint64_t seed, uint64_t tag, uint64_t value)
{
    uint64_t v[3] = {seed, tag, value};
    return loom_hash64(v, sizeof(v), 0x6c6f6f6d);
}

static void emit(const bench_prompter *p, loom_rng *r, bench_prompt *out, loom_buf *text)
{
    if (p->text) {
        int w = (int)(rng_next(r) % (uint64_t)p->n_words);
        buf_append(text, p->words[w], p->word_len[w]);
    } else {
        uint64_t span = (uint64_t)(p->id_hi - p->id_lo);
        out->ids[out->n_ids++] = p->id_lo + (int32_t)(rng_next(r) % span);
    }
}

void bench_prompt_build(const bench_prompter *p, const bench_item *item, uint64_t seed,
                        uint64_t salt, bench_prompt *out)
{
    memset(out, 0, sizeof(*out));
    int n = item->input_len - p->n_special;
    if (n < 1)
        n = 1;
    out->expected_tokens = n + p->n_special;
    loom_buf text;
    buf_init(&text);
    if (!p->text)
        out->ids = xmalloc((size_t)n * sizeof(int32_t));
    int pos = 0;
    loom_rng r;
    for (int b = 0; b < item->n_hash_ids && pos < n; b++) {
        rng_seed(&r, mix_seed(seed, 1, (uint64_t)item->hash_ids[b]));
        for (int j = 0; j < BENCH_BLOCK_TOKENS && pos < n; j++, pos++)
            emit(p, &r, out, &text);
    }
    rng_seed(&r, mix_seed(seed, 2, salt));
    for (; pos < n; pos++)
        emit(p, &r, out, &text);
    if (p->text) {
        out->text_len = text.len;
        out->text = buf_detach(&text);
    }
}

void bench_prompt_free(bench_prompt *pr)
{
    if (!pr)
        return;
    free(pr->ids);
    free(pr->text);
    memset(pr, 0, sizeof(*pr));
}

void bench_prompt_json(const bench_prompt *pr, loom_buf *out)
{
    if (pr->text) {
        /* letters and spaces only: nothing to escape */
        buf_append(out, "\"", 1);
        buf_append(out, pr->text, pr->text_len);
        buf_append(out, "\"", 1);
        return;
    }
    buf_append(out, "[", 1);
    char num[16];
    for (int i = 0; i < pr->n_ids; i++) {
        int len = snprintf(num, sizeof(num), i ? ",%d" : "%d", (int)pr->ids[i]);
        buf_append(out, num, (size_t)len);
    }
    buf_append(out, "]", 1);
}

/* Common English words: most tokenizers hold each, after a space, as one token. */
const char *const bench_candidate_words[] = {
    " the",       " of",       " and",       " to",      " in",     " is",        " you",
    " that",      " it",       " he",        " was",     " for",    " on",        " are",
    " as",        " with",     " his",       " they",    " at",     " be",        " this",
    " have",      " from",     " or",        " one",     " had",    " by",        " word",
    " but",       " not",      " what",      " all",     " were",   " we",        " when",
    " your",      " can",      " said",      " there",   " use",    " an",        " each",
    " which",     " she",      " do",        " how",     " their",  " if",        " will",
    " up",        " other",    " about",     " out",     " many",   " then",      " them",
    " these",     " so",       " some",      " her",     " would",  " make",      " like",
    " him",       " into",     " time",      " has",     " look",   " two",       " more",
    " write",     " go",       " see",       " number",  " no",     " way",       " could",
    " people",    " my",       " than",      " first",   " water",  " been",      " call",
    " who",       " oil",      " its",       " now",     " find",   " long",      " down",
    " day",       " did",      " get",       " come",    " made",   " may",       " part",
    " over",      " new",      " sound",     " take",    " only",   " little",    " work",
    " know",      " place",    " year",      " live",    " me",     " back",      " give",
    " most",      " very",     " after",     " thing",   " our",    " just",      " name",
    " good",      " man",      " think",     " say",     " great",  " where",     " help",
    " much",      " before",   " line",      " right",   " too",    " mean",      " old",
    " any",       " same",     " tell",      " boy",     " follow", " came",      " want",
    " show",      " also",     " around",    " form",    " three",  " small",     " set",
    " put",       " end",      " does",      " another", " well",   " large",     " must",
    " big",       " even",     " such",      " because", " turn",   " here",      " why",
    " ask",       " went",     " men",       " read",    " need",   " land",      " home",
    " us",        " move",     " try",       " kind",    " hand",   " picture",   " again",
    " change",    " off",      " play",      " spell",   " air",    " away",      " animal",
    " house",     " point",    " page",      " letter",  " mother", " answer",    " found",
    " study",     " still",    " learn",     " should",  " world",  " high",      " every",
    " near",      " add",      " food",      " between", " own",    " below",     " country",
    " plant",     " last",     " school",    " father",  " keep",   " tree",      " never",
    " start",     " city",     " earth",     " eye",     " light",  " thought",   " head",
    " under",     " story",    " saw",       " left",    " few",    " while",     " along",
    " might",     " close",    " something", " seem",    " next",   " hard",      " open",
    " example",   " begin",    " life",      " always",  " those",  " both",      " paper",
    " together",  " got",      " group",     " often",   " run",    " important", " until",
    " children",  " side",     " feet",      " car",     " mile",   " night",     " walk",
    " white",     " sea",      " began",     " grow",    " took",   " river",     " four",
    " carry",     " state",    " once",      " book",    " hear",   " stop",      " without",
    " second",    " later",    " miss",      " idea",    " enough", " eat",       " face",
    " watch",     " far",      " really",    " almost",  " let",    " above",     " girl",
    " sometimes", " mountain", " cut",       " young",   " talk",   " soon",      " list",
    " song",      " being",    " leave",     " family",  " king",   " lord",      " love",
    " heart",     " sir",      " thee",      " thou",    " shall",  " death",     " blood",
    " honour",    " speak",    " queen",     " sweet",   " fair",
};
const int bench_n_candidate_words =
    (int)(sizeof(bench_candidate_words) / sizeof(bench_candidate_words[0]));
