/* Fuzz target: arbitrary bytes as a client's request body through gateway_request_inspect (both
 * endpoints), and as an --upstream / admin ?upstream= value through gateway_upstream_parse.
 * An accepted body must give sane routing fields (bounded prefix count, lengths >= 0, a
 * NUL-terminated model); a refused one a message. The prefix hashes must not depend on bytes
 * past the given length. */
#include "loom/gateway.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void check_info(const gateway_request_info *in)
{
    if (in->n_prefix < 0 || in->n_prefix > POLICY_MAX_PREFIX_BLOCKS)
        abort();
    if (!(in->prompt_chars >= 0) || !(in->prompt_ids >= 0) || in->max_tokens < 0)
        abort();
    if (memchr(in->model, 0, sizeof(in->model)) == NULL)
        abort();
    for (int i = 0; i < in->n_prefix; i++)
        if (in->prefix[i] == 0)
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* a copy followed by junk: parsing must stop at size */
    char *buf = malloc(size + 8);
    memcpy(buf, data, size);
    memcpy(buf + size, "\"]}{,\"x", 8);
    for (int k = 0; k < 2; k++) {
        gateway_request_info in;
        char err[160];
        err[0] = 0;
        int rc = gateway_request_inspect(k ? GATEWAY_CHAT : GATEWAY_COMPLETIONS, buf, size,
                                         size % 2 == 0, &in, err, sizeof(err));
        if (rc != 0) {
            if (rc != -1 || !err[0])
                abort();
            continue;
        }
        check_info(&in);
    }
    /* the same bytes as an upstream URL (NUL-terminated, bounded) */
    char url[600];
    size_t n = size < sizeof(url) - 1 ? size : sizeof(url) - 1;
    memcpy(url, data, n);
    url[n] = 0;
    gateway_upstream_spec spec;
    loom_err e;
    if (gateway_upstream_parse(url, &spec, &e) == 0) {
        if (spec.port < 1 || spec.port > 65535 || !spec.host[0] || !(spec.weight > 0) ||
            !isfinite(spec.weight) || strncmp(spec.url, "http://", 7) != 0)
            abort();
        /* the canonical form reads back to itself */
        gateway_upstream_spec again;
        if (gateway_upstream_parse(spec.url, &again, &e) != 0 || strcmp(again.url, spec.url))
            abort();
    } else if (!e.msg[0]) {
        abort();
    }
    free(buf);
    return 0;
}
