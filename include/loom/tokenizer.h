/*
 * tokenizer: Hugging Face tokenizer.json byte-level BPE (pre-tokenizer ByteLevel with the GPT-2
 * regex, or Split with the checkpoint's own regex through PCRE2; a Sequence of those), added and
 * special tokens recognised in text, the post_processor's special tokens, UTF-8-safe streaming
 * decode, and chat templates (chat_template.jinja or tokenizer_config.json).
 */
#ifndef LOOM_TOKENIZER_H
#define LOOM_TOKENIZER_H

#include "loom/base.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct tokenizer tokenizer;

/* Parse tokenizer.json text (pure over bytes: the fuzz target calls it). */
int tokenizer_parse(const char *json, size_t len, tokenizer **out, loom_err *e);
/* Load dir/tokenizer.json, plus dir/tokenizer_config.json (bos/eos tokens, chat_template) and
 * dir/chat_template.jinja (preferred over tokenizer_config.json's) when present. */
int tokenizer_load_dir(const char *dir, tokenizer **out, loom_err *e);
/* A byte-level tokenizer for random-weight presets: ids 0..2 are <|endoftext|>, <|im_start|>,
 * <|im_end|>; 3..258 are the 256 bytes; ids up to vocab_size-1 decode to synthetic pieces
 * (" t<id>"). Carries a ChatML chat template. */
tokenizer *tokenizer_create_bytes(int vocab_size);
void tokenizer_free(tokenizer *t);

int tokenizer_vocab_size(const tokenizer *t);
/* id of a token string (added tokens included), or -1. */
int32_t tokenizer_token_to_id(const tokenizer *t, const char *token);
/* Raw bytes a token decodes to (byte-level mapping undone); NULL for out-of-range ids. */
const char *tokenizer_id_to_bytes(const tokenizer *t, int32_t id, size_t *len);
/* Token text as tokenizer.json writes it (byte-level form, e.g. "\u0120the"); NULL out of range. */
const char *tokenizer_id_to_token(const tokenizer *t, int32_t id);
bool tokenizer_is_special(const tokenizer *t, int32_t id);
int32_t tokenizer_bos_id(const tokenizer *t); /* -1 if none */
int32_t tokenizer_eos_id(const tokenizer *t); /* -1 if none */
const char *tokenizer_bos_token(const tokenizer *t); /* NULL if none */
const char *tokenizer_eos_token(const tokenizer *t);

/* Encode UTF-8 text. Added/special tokens in the text are matched first. When add_special is
 * set the post_processor's tokens are added (none for plain TemplateProcessing "$A"; BOS for
 * Llama-3 style). *ids is malloc'd. Invalid UTF-8 in text is encoded as U+FFFD.
 * A prompt rendered by a chat template already holds the bos_token the template wants: encode
 * it with add_special=false (as transformers' apply_chat_template and vLLM do), or a Llama-3
 * prompt starts with two BOS. */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, bool add_special,
                     int32_t **ids, int *n_ids, loom_err *e);
/* Decode ids to a malloc'd NUL-terminated string; invalid UTF-8 becomes U+FFFD. */
char *tokenizer_decode(const tokenizer *t, const int32_t *ids, int n, bool skip_special);

/* Streaming decode that never splits a UTF-8 character across chunks. */
typedef struct detok_state {
    char pending[8];
    int n_pending;
} detok_state;
void detok_init(detok_state *s);
/* Appends the complete characters now available for token id to out. */
void detok_push(const tokenizer *t, detok_state *s, int32_t id, bool skip_special, loom_buf *out);
/* At the end of a stream: emits what is still pending (as U+FFFD if incomplete). */
void detok_flush(detok_state *s, loom_buf *out);

/* ---------------------------------------------------------------- chat templates */

typedef struct chat_message {
    const char *role;
    const char *content;
} chat_message;

/* The tokenizer's chat template source, or NULL. */
const char *tokenizer_chat_template(const tokenizer *t);
/*
 * Render a Jinja chat template: the subset real templates use (for loops over messages,
 * if/elif/else, set, ==/!=/and/or/not/in, string concatenation with + and ~, filters trim, length,
 * string indexing m['role'] / m.role, loop.first/last/index, raise_exception, bos_token/eos_token,
 * add_generation_prompt). A template it cannot render is an error naming the construct.
 */
int chat_template_render(const char *tmpl, const chat_message *msgs, int n_msgs,
                         bool add_generation_prompt, const char *bos_token, const char *eos_token,
                         char **out, loom_err *e);
/*
 * Same, with every template variable given as one JSON object, for requests that carry more
 * than role/content: {"messages": [{"role": ..., "content": ..., "tool_calls": [...]}, ...],
 * "tools": [...], "add_generation_prompt": true, "bos_token": "<s>", ...}. Keys absent from the
 * object are undefined in the template.
 */
int chat_template_render_json(const char *tmpl, const char *vars_json, char **out, loom_err *e);
/* Renders the tokenizer's own template with its bos/eos tokens; LOOM_ENOTFOUND without one. */
int tokenizer_apply_chat_template(const tokenizer *t, const chat_message *msgs, int n_msgs,
                                  bool add_generation_prompt, char **out, loom_err *e);

#endif
