/* Fuzz target: arbitrary bytes as tokenizer.json through tokenizer_parse. An accepted tokenizer
 * then encodes fixed texts and the input itself, and every id it returns must be in range and
 * decode (whole and streamed) to the same valid UTF-8. */
#include "loom/tokenizer.h"

#include <stdlib.h>
#include <string.h>

static void check_round(const tokenizer *t, const char *text, size_t len)
{
    int32_t *ids = NULL;
    int n = 0;
    loom_err e;
    for (int add_special = 0; add_special < 2; add_special++) {
        if (tokenizer_encode(t, text, len, add_special, &ids, &n, &e) != LOOM_OK)
            continue;
        int vocab = tokenizer_vocab_size(t);
        for (int i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= vocab)
                abort();
        char *whole = tokenizer_decode(t, ids, n, false);
        detok_state st;
        detok_init(&st);
        loom_buf all;
        buf_init(&all);
        for (int i = 0; i < n; i++)
            detok_push(t, &st, ids[i], false, &all);
        detok_flush(&st, &all);
        buf_append(&all, NULL, 0);
        if (strcmp(all.data, whole) != 0)
            abort();
        buf_free(&all);
        free(whole);
        free(ids);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    tokenizer *t = NULL;
    loom_err e;
    if (tokenizer_parse((const char *)data, size, &t, &e) != LOOM_OK)
        return 0;
    static const char text[] = "Hello, world! It's 2026 -- caf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC "
                               "\xF0\x9F\x98\x80 tabs\tand  spaces\n\n<|im_start|>user 12345 "
                               "<s></s>\xFF\xC3";
    check_round(t, text, sizeof(text) - 1);
    check_round(t, (const char *)data, size < 512 ? size : 512);
    /* every id decodes; specials are skippable */
    int vocab = tokenizer_vocab_size(t);
    for (int32_t id = 0; id < vocab && id < 4096; id++) {
        size_t len;
        if (!tokenizer_id_to_bytes(t, id, &len))
            abort();
        (void)tokenizer_is_special(t, id);
        (void)tokenizer_id_to_token(t, id);
    }
    if (tokenizer_id_to_bytes(t, vocab, NULL) || tokenizer_id_to_bytes(t, -1, NULL))
        abort();
    tokenizer_free(t);
    return 0;
}
