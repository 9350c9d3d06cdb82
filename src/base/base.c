/* base: errors, logging, allocation, files, buffers, time, rng, hash. */
#define _GNU_SOURCE
#include "loom/base.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

int loom_log_level = 2;

int loom_errf(loom_err *e, int code, const char *fmt, ...)
{
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        e->code = code;
        vsnprintf(e->msg, sizeof(e->msg), fmt, ap);
        va_end(ap);
    }
    return code;
}

const char *loom_strerror(int code)
{
    switch (code) {
    case LOOM_OK: return "ok";
    case LOOM_EINVAL: return "invalid argument";
    case LOOM_ENOMEM: return "out of memory";
    case LOOM_EIO: return "i/o error";
    case LOOM_EFORMAT: return "corrupt or truncated file";
    case LOOM_EUNSUPPORTED: return "unsupported";
    case LOOM_ENOTFOUND: return "not found";
    case LOOM_EFULL: return "full";
    case LOOM_ETOOLONG: return "too long";
    default: return "unknown error";
    }
}

void loom_log(int level, const char *fmt, ...)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    static int env_read;
    if (!env_read) { /* LOOM_LOG=0..3 overrides the level once, at the first message */
        const char *env = getenv("LOOM_LOG");
        if (env && *env >= '0' && *env <= '3')
            loom_log_level = *env - '0';
        env_read = 1;
    }
    if (level > loom_log_level)
        return;
    char line[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    fprintf(stderr, "loom %s: %s\n", names[level < 0 ? 0 : level > 3 ? 3 : level], line);
}

static void oom(size_t n)
{
    fprintf(stderr, "loom: out of memory allocating %zu bytes\n", n);
    abort();
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        oom(n * size);
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *xstrdup(const char *s)
{
    return xstrndup(s, strlen(s));
}

char *xstrndup(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

void *loom_alloc_aligned(size_t n)
{
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0)
        return NULL;
    return p;
}

void loom_free_aligned(void *p)
{
    free(p);
}

double loom_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

double loom_wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int loom_read_file(const char *path, char **out, size_t *len, loom_err *e)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return loom_errf(e, errno == ENOENT ? LOOM_ENOTFOUND : LOOM_EIO, "cannot open %s: %s",
                         path, strerror(errno));
    loom_buf b;
    buf_init(&b);
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        buf_append(&b, chunk, n);
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        buf_free(&b);
        return loom_errf(e, LOOM_EIO, "error reading %s", path);
    }
    if (len)
        *len = b.len;
    *out = buf_detach(&b);
    return LOOM_OK;
}

bool loom_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

char *loom_path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = xmalloc(a + b + 2);
    memcpy(p, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/')
        p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

void buf_init(loom_buf *b)
{
    b->data = NULL;
    b->len = b->cap = 0;
}

void buf_free(loom_buf *b)
{
    free(b->data);
    buf_init(b);
}

void buf_append(loom_buf *b, const void *p, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n + 1)
            cap *= 2;
        b->data = xrealloc(b->data, cap);
        b->cap = cap;
    }
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;
}

void buf_puts(loom_buf *b, const char *s)
{
    buf_append(b, s, strlen(s));
}

void buf_printf(loom_buf *b, const char *fmt, ...)
{
    va_list ap, ap2;
    va_start(ap, fmt);
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n > 0) {
        buf_append(b, NULL, 0);
        if (b->len + (size_t)n + 1 > b->cap) {
            size_t cap = b->cap;
            while (cap < b->len + (size_t)n + 1)
                cap *= 2;
            b->data = xrealloc(b->data, cap);
            b->cap = cap;
        }
        vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap2);
        b->len += (size_t)n;
    }
    va_end(ap2);
}

char *buf_detach(loom_buf *b)
{
    if (!b->data)
        buf_append(b, NULL, 0);
    char *p = b->data;
    buf_init(b);
    return p;
}

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void rng_seed(loom_rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

uint64_t rng_next(loom_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double rng_uniform(loom_rng *r)
{
    return (rng_next(r) >> 11) * 0x1.0p-53;
}

float rng_normal(loom_rng *r)
{
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    if (u1 < 1e-300)
        u1 = 1e-300;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

uint64_t loom_hash64(const void *data, size_t n, uint64_t seed)
{
    const unsigned char *p = data;
    uint64_t h = 0xcbf29ce484222325ULL ^ seed;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
}
