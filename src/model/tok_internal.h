/* Shared between the tokenizer's source files (src/model/tokenizer.c, tok_load.c,
 * chat_template.c); not a public interface. */
#ifndef LOOM_TOK_INTERNAL_H
#define LOOM_TOK_INTERNAL_H

#include "loom/tokenizer.h"

/*
 * Classifies the UTF-8 sequence at s[0..n), n >= 1:
 *   k > 0   a valid character of k bytes;
 *   0       a valid but incomplete prefix that runs to the end of the input;
 *   -k < 0  invalid: the maximal subpart is k bytes (one U+FFFD replaces them).
 */
int tok_utf8_char(const unsigned char *s, size_t n);
/* Appends s[0..n) to out with invalid sequences replaced by U+FFFD. When !final an incomplete
 * trailing character is not emitted; returns its length (0..3). */
size_t tok_utf8_emit(const unsigned char *s, size_t n, bool final, loom_buf *out);

/* Set by tokenizer_load_dir from tokenizer_config.json / chat_template.jinja. */
void tok_set_special_tokens(tokenizer *t, const char *bos, const char *eos);
void tok_set_chat_template(tokenizer *t, const char *tmpl);

#endif
