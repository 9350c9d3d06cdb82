/* Fuzz target: arbitrary bytes as an upstream's event stream through gateway_sse_feed, whole and
 * cut into pieces at points taken from the data itself: the counts must not depend on how the
 * stream was cut, and the scanner's line buffer stays bounded. Also gateway_usage_parse. */
#include "loom/gateway.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    gateway_sse whole, cut;
    gateway_sse_init(&whole);
    gateway_sse_init(&cut);
    gateway_sse_feed(&whole, (const char *)data, size);
    size_t off = 0, k = 0;
    while (off < size) {
        size_t step = 1 + (size_t)(k < size ? data[k] : 7) % 61;
        if (step > size - off)
            step = size - off;
        gateway_sse_feed(&cut, (const char *)data + off, step);
        off += step;
        k++;
    }
    if (whole.frames != cut.frames || whole.content_frames != cut.content_frames ||
        whole.done != cut.done || whole.error != cut.error ||
        whole.prompt_tokens != cut.prompt_tokens ||
        whole.completion_tokens != cut.completion_tokens)
        abort();
    if (whole.cap > 128 * 1024 || cut.cap > 128 * 1024 || whole.content_frames > whole.frames)
        abort();
    gateway_sse_free(&whole);
    gateway_sse_free(&cut);
    double p, c;
    gateway_usage_parse((const char *)data, size, &p, &c);
    if ((p < 0 && p != -1) || (c < 0 && c != -1))
        abort();
    return 0;
}
