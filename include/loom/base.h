/*
 * base: errors, logging, allocation, time, small helpers shared by every module.
 *
 * Error convention (libuv/SQLite style): library functions return 0 on success or a negative
 * LOOM_E* code, and fill a caller-provided loom_err with a one-line message. Library code never
 * calls exit(); only src/cli/ does.
 */
#ifndef LOOM_BASE_H
#define LOOM_BASE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum {
    LOOM_OK = 0,
    LOOM_EINVAL = -1,      /* bad argument or malformed input */
    LOOM_ENOMEM = -2,      /* allocation failed */
    LOOM_EIO = -3,         /* file or socket error */
    LOOM_EFORMAT = -4,     /* corrupt or truncated file */
    LOOM_EUNSUPPORTED = -5,/* valid but not supported (architecture, dtype) */
    LOOM_ENOTFOUND = -6,   /* missing file, tensor, model */
    LOOM_EFULL = -7,       /* queue or cache full */
    LOOM_ETOOLONG = -8,    /* prompt + max_tokens over the context */
};

typedef struct loom_err {
    int code;
    char msg[512];
} loom_err;

/* Sets e (if non-NULL) to code and a formatted message; returns code. */
int loom_errf(loom_err *e, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
const char *loom_strerror(int code);

/* Logging to stderr. Level: 0 error, 1 warn, 2 info, 3 debug. LOOM_LOG env or loom_log_level. */
extern int loom_log_level;
void loom_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define LOG_ERROR(...) loom_log(0, __VA_ARGS__)
#define LOG_WARN(...) loom_log(1, __VA_ARGS__)
#define LOG_INFO(...) loom_log(2, __VA_ARGS__)
#define LOG_DEBUG(...) loom_log(3, __VA_ARGS__)

/* Allocation that aborts on out-of-memory (used for small bookkeeping, never for sizes
 * that come from untrusted input; those use plain malloc and return LOOM_ENOMEM). */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
/* 64-byte aligned allocation for tensors; free with loom_free_aligned. NULL on failure. */
void *loom_alloc_aligned(size_t n);
void loom_free_aligned(void *p);

/* Overflow-checked arithmetic for sizes from file headers: returns false on overflow. */
static inline bool loom_mul_ok(size_t a, size_t b, size_t *out) {
    return !__builtin_mul_overflow(a, b, out);
}
static inline bool loom_add_ok(size_t a, size_t b, size_t *out) {
    return !__builtin_add_overflow(a, b, out);
}

/* Monotonic time in seconds. */
double loom_now(void);
/* Wall-clock time in seconds since the epoch. */
double loom_wall(void);

/* Whole file into a NUL-terminated heap buffer. */
int loom_read_file(const char *path, char **out, size_t *len, loom_err *e);
bool loom_file_exists(const char *path);
/* path join into a new heap string */
char *loom_path_join(const char *dir, const char *name);

/* Growable byte buffer (for building JSON/text). */
typedef struct loom_buf {
    char *data;
    size_t len, cap;
} loom_buf;
void buf_init(loom_buf *b);
void buf_free(loom_buf *b);
void buf_append(loom_buf *b, const void *p, size_t n);
void buf_puts(loom_buf *b, const char *s);
void buf_printf(loom_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
char *buf_detach(loom_buf *b); /* NUL-terminated; buffer reset */

/* Deterministic PRNG (xoshiro256**-style splitmix seeded). */
typedef struct loom_rng {
    uint64_t s[4];
} loom_rng;
void rng_seed(loom_rng *r, uint64_t seed);
uint64_t rng_next(loom_rng *r);
double rng_uniform(loom_rng *r);  /* [0,1) */
float rng_normal(loom_rng *r);    /* standard normal */

/* FNV-1a / 64-bit mixing hash */
uint64_t loom_hash64(const void *data, size_t n, uint64_t seed);

#endif
