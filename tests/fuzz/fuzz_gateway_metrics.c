/* Fuzz target: arbitrary bytes as an upstream's /metrics page through gateway_prom_parse and
 * gateway_scrape_parse. Every sample handed out must have a well-formed name and at most 16
 * labels; the gauges read must be in range; nothing may read past the given length. */
#include "loom/gateway.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void on_sample(void *ctx, const gateway_prom_sample *s)
{
    int *count = ctx;
    (*count)++;
    if (!s->name || !s->name[0] || s->n_labels < 0 || s->n_labels > 16)
        abort();
    for (const char *p = s->name; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '_' || *p == ':'))
            abort();
    for (int i = 0; i < s->n_labels; i++)
        if (!s->label_names[i] || !s->label_values[i])
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = malloc(size ? size : 1);
    memcpy(buf, data, size);
    int count = 0;
    int n = gateway_prom_parse(buf, size, on_sample, &count);
    if (n != count || n < 0)
        abort();
    gateway_scrape s;
    gateway_scrape_parse(buf, size, &s);
    if (s.samples != n)
        abort();
    if (s.kv_usage > 1 || (s.kv_usage < 0 && s.kv_usage != -1))
        abort();
    if ((s.num_running < 0 && s.num_running != -1) || (s.num_waiting < 0 && s.num_waiting != -1))
        abort();
    double kv = gateway_scrape_kv_tokens(&s, 16);
    if (!(kv == -1 || kv > 0))
        abort();
    free(buf);
    return 0;
}
