/* Fuzz target: arbitrary bytes as a Jinja chat template, rendered over a fixed conversation
 * (plain and through the JSON-variables entry with tools and tool calls). Must never crash;
 * a failure must come with a message. */
#include "loom/tokenizer.h"

#include <stdlib.h>
#include <string.h>

static const char VARS[] =
    "{\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
    "{\"role\":\"user\",\"content\":\"Hi \\u00e9\\u65e5\"},"
    "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"type\":\"function\","
    "\"function\":{\"name\":\"f\",\"arguments\":{\"a\":1,\"b\":[true,null,2.5]}}}]},"
    "{\"role\":\"tool\",\"content\":\"42\"}],"
    "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}],"
    "\"add_generation_prompt\":true,\"bos_token\":\"<s>\",\"eos_token\":\"</s>\"}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *tmpl = malloc(size + 1);
    if (!tmpl)
        return 0;
    memcpy(tmpl, data, size);
    tmpl[size] = 0;
    static const chat_message msgs[] = {
        {"system", "You are terse."},
        {"user", " Hi! "},
        {"assistant", "Hello."},
        {"user", NULL},
    };
    char *out = NULL;
    loom_err e;
    e.msg[0] = 0;
    int rc = chat_template_render(tmpl, msgs, 4, true, "<s>", NULL, &out, &e);
    if ((rc == LOOM_OK) != (out != NULL) || (rc != LOOM_OK && !e.msg[0]))
        abort();
    free(out);
    out = NULL;
    e.msg[0] = 0;
    rc = chat_template_render_json(tmpl, VARS, &out, &e);
    if ((rc == LOOM_OK) != (out != NULL) || (rc != LOOM_OK && !e.msg[0]))
        abort();
    free(out);
    free(tmpl);
    return 0;
}
