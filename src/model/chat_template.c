/*
 * chat_template: a small Jinja2 interpreter for Hugging Face chat templates.
 *
 * It renders what real chat templates use, in the environment transformers sets up:
 * trim_blocks and lstrip_blocks on, loop controls (break/continue), the globals
 * raise_exception, strftime_now, namespace, range, and a tojson filter that writes like
 * Python's json.dumps(ensure_ascii=False).
 *
 *   statements   if/elif/else, for (tuple targets, `if` filter, else, loop.*), set (names,
 *                namespace attributes, tuples, {% set x %}...{% endset %}), macro, break,
 *                continue, generation, raw, comments, whitespace control {%- -%} {{- -}}
 *   expressions  literals (str, int, float, bool, none, list, tuple, dict), attribute and item
 *                access, slices, calls, `x if c else y`, and/or/not, == != < > <= >= in,
 *                not in, is [not] <test>, + - * / // % ** ~
 *   filters      trim length count upper lower capitalize title tojson string default d join
 *                first last list reverse replace items safe int float abs indent select
 *                reject selectattr rejectattr map unique sort min max sum wordcount dictsort
 *   tests        defined undefined none string number integer float boolean true false
 *                mapping sequence iterable callable lower upper even odd divisibleby eq ne
 *                lt gt le ge in sameas
 *   methods      str: strip lstrip rstrip startswith endswith split upper lower title
 *                capitalize replace find count join isdigit isspace isalpha;
 *                dict: get items keys values
 *
 * Differences from Jinja, on purpose: an attribute or item of an undefined value is undefined
 * rather than an error, and an undefined value concatenates as "" (templates that work under
 * Jinja render the same). Upper/lower case mapping is ASCII only. Not supported: `%` string
 * formatting, include/import/extends/block, call blocks, filter blocks, recursive loops.
 * Checked against Jinja 3.1 on real templates (ChatML, Llama-3/3.1, Mistral, Qwen2.5, Gemma,
 * Phi-3, DeepSeek, Zephyr) and on randomly generated whitespace-control templates.
 *
 * Anything else fails cleanly: LOOM_EUNSUPPORTED names the construct and its line and column;
 * syntax errors are LOOM_EFORMAT; runtime errors and raise_exception() are LOOM_EINVAL
 * (raise_exception's message verbatim). Work, nesting depth, memory and output are bounded.
 *
 * Errors unwind with longjmp to chat_template_render (as Lua's interpreter does): every
 * allocation of a render lives in one arena that is freed as a whole, so nothing leaks.
 */
#define _GNU_SOURCE
#include "loom/tokenizer.h"
#include "tok_internal.h"

#include <cJSON.h>
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define JT_MAX_DEPTH 200           /* nesting of expressions, statements and macro calls */
#define JT_MAX_STEPS 5000000L      /* evaluation steps of one render */
#define JT_MAX_OUTPUT (64u << 20)  /* bytes of rendered text (and of any one string) */
#define JT_MAX_MEMORY (512u << 20) /* arena bytes of one render */
#define JT_CHUNK (64u << 10)

/* ---------------------------------------------------------------- context and arena */

typedef struct chunk {
    struct chunk *next;
    size_t used, cap;
    max_align_t data[];
} chunk;

typedef struct node node;
typedef struct token token;

typedef struct jctx {
    jmp_buf jmp;
    loom_err *e;
    int code;
    chunk *chunks;
    size_t mem;
    const char *src;
    token *toks;
    size_t n_toks, pos;
    int depth, loop_depth;
    long steps;
} jctx;

static _Noreturn void fail_at(jctx *c, int code, int line, int col, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static _Noreturn void fail_at(jctx *c, int code, int line, int col, const char *fmt, ...)
{
    char msg[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (line > 0)
        loom_errf(c->e, code, "chat template: %s (line %d, column %d)", msg, line, col);
    else
        loom_errf(c->e, code, "chat template: %s", msg);
    c->code = code;
    longjmp(c->jmp, 1);
}

/*
 * Work in proportion to size: scanning or copying 256 bytes, or probing 256 dictionary entries,
 * costs one evaluation step, so long strings cannot stretch a render past its step budget.
 */
static void charge(jctx *c, size_t units)
{
    c->steps += (long)(units >> 8);
    if (c->steps > JT_MAX_STEPS)
        fail_at(c, LOOM_ETOOLONG, 0, 0, "rendering took more than %ld steps", JT_MAX_STEPS);
}

static void *arena_alloc(jctx *c, size_t n)
{
    charge(c, n);
    n = (n + 15) & ~(size_t)15;
    chunk *head = c->chunks;
    if (head && head->cap - head->used >= n) {
        void *p = (char *)head->data + head->used;
        head->used += n;
        return p;
    }
    size_t cap = n > JT_CHUNK / 4 ? n : JT_CHUNK;
    if (c->mem + cap > JT_MAX_MEMORY)
        fail_at(c, LOOM_ENOMEM, 0, 0, "rendering needs more than %u MiB", JT_MAX_MEMORY >> 20);
    chunk *k = malloc(sizeof(chunk) + cap);
    if (!k)
        fail_at(c, LOOM_ENOMEM, 0, 0, "out of memory");
    c->mem += cap;
    k->used = n;
    k->cap = cap;
    if (head && cap != JT_CHUNK) { /* a big block: keep filling the current chunk */
        k->next = head->next;
        head->next = k;
    } else {
        k->next = head;
        c->chunks = k;
    }
    return k->data;
}

static char *arena_strndup(jctx *c, const char *s, size_t n)
{
    char *p = arena_alloc(c, n + 1);
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

static void arena_free(jctx *c)
{
    while (c->chunks) {
        chunk *k = c->chunks;
        c->chunks = k->next;
        free(k);
    }
}

/* A growable string in the arena. */
typedef struct sbuf {
    char *d;
    size_t n, cap;
} sbuf;

static void sb_put(jctx *c, sbuf *b, const char *s, size_t n)
{
    if (n == 0)
        return;
    charge(c, n);
    if (b->n + n > JT_MAX_OUTPUT)
        fail_at(c, LOOM_ETOOLONG, 0, 0, "output longer than %u MiB", JT_MAX_OUTPUT >> 20);
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->n + n)
            cap *= 2;
        char *d = arena_alloc(c, cap);
        if (b->n)
            memcpy(d, b->d, b->n);
        b->d = d;
        b->cap = cap;
    }
    memcpy(b->d + b->n, s, n);
    b->n += n;
}

static void sb_puts(jctx *c, sbuf *b, const char *s)
{
    sb_put(c, b, s, strlen(s));
}

static void sb_printf(jctx *c, sbuf *b, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void sb_printf(jctx *c, sbuf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n > 0)
        sb_put(c, b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* ---------------------------------------------------------------- lexer */

enum tok_kind {
    T_TEXT,
    T_VAR_BEGIN,
    T_VAR_END,
    T_BLOCK_BEGIN,
    T_BLOCK_END,
    T_NAME,
    T_STRING,
    T_INT,
    T_FLOAT,
    T_OP,
    T_EOF,
};

struct token {
    int kind;
    const char *s; /* source text; for T_STRING the unescaped value (arena) */
    size_t n;
    int line, col;
    int64_t i;
    double f;
};

typedef struct lexer {
    jctx *c;
    const char *src, *end;
    const char *lp; /* position that line/lcol describe */
    int line;
    const char *line_start;
    size_t cap;
} lexer;

static void lex_locate(lexer *lx, const char *p, int *line, int *col)
{
    while (lx->lp < p) {
        if (*lx->lp == '\n') {
            lx->line++;
            lx->line_start = lx->lp + 1;
        }
        lx->lp++;
    }
    *line = lx->line;
    *col = (int)(p - lx->line_start) + 1;
}

static token *lex_push(lexer *lx, int kind, const char *s, size_t n, const char *at)
{
    jctx *c = lx->c;
    if (c->n_toks == lx->cap) {
        size_t cap = lx->cap ? lx->cap * 2 : 256;
        token *t = arena_alloc(c, cap * sizeof(token));
        if (c->n_toks)
            memcpy(t, c->toks, c->n_toks * sizeof(token));
        c->toks = t;
        lx->cap = cap;
    }
    token *t = &c->toks[c->n_toks++];
    memset(t, 0, sizeof(*t));
    t->kind = kind;
    t->s = s;
    t->n = n;
    lex_locate(lx, at, &t->line, &t->col);
    return t;
}

static _Noreturn void lex_fail(lexer *lx, int code, const char *at, const char *what)
{
    int line, col;
    lex_locate(lx, at, &line, &col);
    fail_at(lx->c, code, line, col, "%s", what);
}

static bool is_ws(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f';
}

static bool is_name_start(char ch)
{
    return ch == '_' || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
}

static bool is_digit(char ch)
{
    return ch >= '0' && ch <= '9';
}

static void put_utf8(jctx *c, sbuf *b, uint32_t cp)
{
    char u[4];
    size_t n;
    if (cp >= 0xD800 && cp <= 0xDFFF)
        cp = 0xFFFD;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else if (cp < 0x110000) {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    } else {
        put_utf8(c, b, 0xFFFD);
        return;
    }
    sb_put(c, b, u, n);
}

static int hex_value(char ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if ((ch | 0x20) >= 'a' && (ch | 0x20) <= 'f')
        return (ch | 0x20) - 'a' + 10;
    return -1;
}

/* A string literal at p (quote included), unescaped as Python's unicode-escape does. */
static const char *lex_string(lexer *lx, const char *p)
{
    jctx *c = lx->c;
    char q = *p;
    const char *start = p++;
    sbuf b = {0};
    while (p < lx->end && *p != q) {
        if (*p != '\\' || p + 1 >= lx->end) {
            sb_put(c, &b, p++, 1);
            continue;
        }
        char x = p[1];
        const char *simple = strchr("\\'\"abfnrtv\n", x);
        if (x && simple) {
            static const char out[] = "\\'\"\a\b\f\n\r\t\v";
            if (x != '\n') /* backslash-newline is a line continuation */
                sb_put(c, &b, &out[simple - "\\'\"abfnrtv\n"], 1);
            p += 2;
        } else if (x >= '0' && x <= '7') {
            uint32_t v = 0;
            int k = 1;
            while (k <= 3 && p + k < lx->end && p[k] >= '0' && p[k] <= '7')
                v = v * 8 + (uint32_t)(p[k++] - '0');
            put_utf8(c, &b, v);
            p += k;
        } else if (x == 'x' || x == 'u' || x == 'U') {
            int digits = x == 'x' ? 2 : x == 'u' ? 4 : 8;
            uint32_t v = 0;
            for (int k = 0; k < digits; k++) {
                int h = p + 2 + k < lx->end ? hex_value(p[2 + k]) : -1;
                if (h < 0)
                    lex_fail(lx, LOOM_EFORMAT, p, "syntax error: truncated \\x/\\u escape");
                v = v * 16 + (uint32_t)h;
            }
            put_utf8(c, &b, v);
            p += 2 + digits;
        } else { /* unknown escapes stay as written */
            sb_put(c, &b, p, 2);
            p += 2;
        }
    }
    if (p >= lx->end)
        lex_fail(lx, LOOM_EFORMAT, start, "syntax error: unterminated string literal");
    token *t = lex_push(lx, T_STRING, b.d ? b.d : "", b.n, start);
    (void)t;
    return p + 1;
}

/*
 * The inside of a {{ }} or {% %} tag, up to and including its end. Returns the position after
 * the tag; *strip_after is set for "-}}"/"-%}", *keep_newline for "+%}".
 */
static const char *lex_tag(lexer *lx, const char *p, bool block, bool *strip_after,
                           bool *keep_newline)
{
    char close = block ? '%' : '}';
    int balance = 0; /* ( [ { nesting: "}}" inside a dict literal does not end the tag */
    const char *tag_start = p;
    for (;;) {
        while (p < lx->end && is_ws(*p))
            p++;
        if (p >= lx->end)
            lex_fail(lx, LOOM_EFORMAT, tag_start - 2,
                     block ? "syntax error: unclosed '{%'" : "syntax error: unclosed '{{'");
        if (balance == 0) {
            if ((*p == '-' || *p == '+') && p + 2 < lx->end && p[1] == close && p[2] == '}') {
                *strip_after = *p == '-';
                *keep_newline = *p == '+';
                lex_push(lx, block ? T_BLOCK_END : T_VAR_END, p, 3, p);
                return p + 3;
            }
            if (*p == close && p + 1 < lx->end && p[1] == '}') {
                lex_push(lx, block ? T_BLOCK_END : T_VAR_END, p, 2, p);
                return p + 2;
            }
        }
        char ch = *p;
        if (is_name_start(ch)) {
            const char *s = p;
            while (p < lx->end && (is_name_start(*p) || is_digit(*p)))
                p++;
            lex_push(lx, T_NAME, s, (size_t)(p - s), s);
        } else if (is_digit(ch)) {
            const char *s = p;
            bool is_float = false;
            while (p < lx->end && (is_digit(*p) || *p == '_'))
                p++;
            if (p + 1 < lx->end && *p == '.' && is_digit(p[1])) {
                is_float = true;
                p++;
                while (p < lx->end && is_digit(*p))
                    p++;
            }
            if (p < lx->end && (*p == 'e' || *p == 'E')) {
                const char *q = p + 1;
                if (q < lx->end && (*q == '+' || *q == '-'))
                    q++;
                if (q < lx->end && is_digit(*q)) {
                    is_float = true;
                    p = q;
                    while (p < lx->end && is_digit(*p))
                        p++;
                }
            }
            char num[64];
            size_t k = 0;
            for (const char *q = s; q < p && k < sizeof(num) - 1; q++)
                if (*q != '_')
                    num[k++] = *q;
            num[k] = 0;
            token *t = lex_push(lx, is_float ? T_FLOAT : T_INT, s, (size_t)(p - s), s);
            if (is_float) {
                t->f = strtod(num, NULL);
            } else {
                errno = 0;
                t->i = strtoll(num, NULL, 10);
                if (errno)
                    lex_fail(lx, LOOM_EUNSUPPORTED, s, "integer literal out of range");
            }
        } else if (ch == '\'' || ch == '"') {
            p = lex_string(lx, p);
        } else {
            static const char *two[] = {"==", "!=", "<=", ">=", "//", "**"};
            size_t n = 0;
            for (int k = 0; k < 6; k++)
                if (p + 1 < lx->end && p[0] == two[k][0] && p[1] == two[k][1])
                    n = 2;
            if (!n && strchr("+-*/%~<>=()[]{}.,:|", ch) && ch)
                n = 1;
            if (!n) {
                char what[64];
                snprintf(what, sizeof(what), "syntax error: unexpected character '%c'",
                         ch >= 32 && ch < 127 ? ch : '?');
                lex_fail(lx, LOOM_EFORMAT, p, what);
            }
            if (n == 1 && (ch == '(' || ch == '[' || ch == '{'))
                balance++;
            if (n == 1 && (ch == ')' || ch == ']' || ch == '}') && balance > 0)
                balance--;
            lex_push(lx, T_OP, p, n, p);
            p += n;
        }
    }
}

/* Finds "{% endraw %}" (with optional whitespace control); NULL if absent. */
static const char *find_endraw(const char *p, const char *end, const char **after, bool *lstrip,
                               bool *strip_after)
{
    for (const char *q = p; q + 1 < end; q++) {
        if (q[0] != '{' || q[1] != '%')
            continue;
        const char *r = q + 2;
        *lstrip = r < end && *r == '-';
        if (r < end && (*r == '-' || *r == '+'))
            r++;
        while (r < end && is_ws(*r))
            r++;
        if ((size_t)(end - r) < 6 || memcmp(r, "endraw", 6) != 0)
            continue;
        r += 6;
        while (r < end && is_ws(*r))
            r++;
        *strip_after = r < end && *r == '-';
        if (r < end && (*r == '-' || *r == '+'))
            r++;
        if (r + 1 < end && r[0] == '%' && r[1] == '}') {
            *after = r + 2;
            return q;
        }
    }
    return NULL;
}

/*
 * Splits the template into text and tag tokens, applying Jinja's whitespace control with
 * trim_blocks (drop the newline after a block tag) and lstrip_blocks (drop spaces and tabs
 * before a block tag that starts a line), and keep_trailing_newline off.
 */
static void lex(jctx *c, const char *src, size_t n)
{
    lexer lx = {.c = c, .src = src, .end = src + n, .lp = src, .line = 1, .line_start = src};
    if (lx.end > src && lx.end[-1] == '\n') {
        lx.end--;
        if (lx.end > src && lx.end[-1] == '\r')
            lx.end--;
    }
    const char *p = src;
    bool strip_next = false, trim_next = false;
    while (p <= lx.end) {
        const char *q = p;
        while (q + 1 < lx.end && !(q[0] == '{' && (q[1] == '{' || q[1] == '%' || q[1] == '#')))
            q++;
        if (q + 1 >= lx.end)
            q = lx.end;
        const char *ts = p, *te = q;
        if (strip_next) {
            while (ts < te && is_ws(*ts))
                ts++;
        } else if (trim_next) {
            if (ts < te && *ts == '\n')
                ts++;
            else if (te - ts >= 2 && ts[0] == '\r' && ts[1] == '\n')
                ts += 2;
        }
        strip_next = trim_next = false;
        char kind = q < lx.end ? q[1] : 0;
        char mod = q + 2 < lx.end ? q[2] : 0;
        if (kind && mod == '-') {
            while (te > ts && is_ws(te[-1]))
                te--;
        } else if ((kind == '%' || kind == '#') && mod != '+') {
            const char *ls = te;
            while (ls > ts && (ls[-1] == ' ' || ls[-1] == '\t'))
                ls--;
            bool line_start = ls > ts ? ls[-1] == '\n' : (ts == src || ts[-1] == '\n');
            if (line_start)
                te = ls;
        }
        if (te > ts)
            lex_push(&lx, T_TEXT, ts, (size_t)(te - ts), ts);
        if (q >= lx.end)
            break;
        const char *body = q + 2 + (mod == '-' || mod == '+');
        if (kind == '#') {
            const char *r = body;
            while (r + 1 < lx.end && !(r[0] == '#' && r[1] == '}'))
                r++;
            if (r + 1 >= lx.end)
                lex_fail(&lx, LOOM_EFORMAT, q, "syntax error: unclosed comment '{#'");
            strip_next = r > body && r[-1] == '-';
            trim_next = !(r > body && (r[-1] == '-' || r[-1] == '+'));
            p = r + 2;
            continue;
        }
        bool block = kind == '%';
        bool strip_after = false, keep_newline = false;
        size_t first = c->n_toks;
        lex_push(&lx, block ? T_BLOCK_BEGIN : T_VAR_BEGIN, q, 2, q);
        p = lex_tag(&lx, body, block, &strip_after, &keep_newline);
        strip_next = strip_after;
        trim_next = block && !strip_after && !keep_newline;
        token *t = &c->toks[first];
        if (block && c->n_toks == first + 3 && t[1].kind == T_NAME && t[1].n == 3 &&
            memcmp(t[1].s, "raw", 3) == 0) {
            /* {% raw %}: everything up to {% endraw %} is text */
            const char *after;
            bool lstrip, strip2;
            const char *r = find_endraw(p, lx.end, &after, &lstrip, &strip2);
            if (!r)
                lex_fail(&lx, LOOM_EFORMAT, q, "syntax error: {% raw %} without {% endraw %}");
            c->n_toks = first;
            const char *rs = p, *re = r;
            if (strip_next)
                while (rs < re && is_ws(*rs))
                    rs++;
            else if (trim_next && rs < re && *rs == '\n')
                rs++;
            if (lstrip)
                while (re > rs && is_ws(re[-1]))
                    re--;
            if (re > rs)
                lex_push(&lx, T_TEXT, rs, (size_t)(re - rs), rs);
            strip_next = strip2;
            trim_next = !strip2;
            p = after;
        }
    }
    lex_push(&lx, T_EOF, lx.end, 0, lx.end);
}

/* ---------------------------------------------------------------- AST */

enum node_kind {
    /* statements */
    S_TEXT,
    S_OUTPUT,
    S_IF,
    S_FOR,
    S_SET,
    S_SET_ATTR,
    S_SET_BLOCK,
    S_MACRO,
    S_BREAK,
    S_CONTINUE,
    S_BODY,
    /* expressions */
    E_LIT,
    E_NAME,
    E_ATTR,
    E_ITEM,
    E_SLICE,
    E_CALL,
    E_FILTER,
    E_TEST,
    E_NOT,
    E_NEG,
    E_POS,
    E_BIN,
    E_CMP,
    E_AND,
    E_OR,
    E_COND,
    E_LIST,
    E_TUPLE,
    E_DICT,
};

enum bin_op { OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_FLOORDIV, OP_MOD, OP_POW, OP_CONCAT };
enum cmp_op { CMP_EQ, CMP_NE, CMP_LT, CMP_GT, CMP_LE, CMP_GE, CMP_IN, CMP_NOT_IN };

typedef struct vlist vlist;
typedef struct vdict vdict;
typedef struct macro macro;

enum vtype { V_UNDEF, V_NONE, V_BOOL, V_INT, V_FLOAT, V_STR, V_LIST, V_DICT, V_MACRO, V_FUNC };

typedef struct value {
    int t;
    union {
        bool b;
        int64_t i;
        double f;
        struct {
            const char *s;
            size_t n;
        } s;
        vlist *l;
        vdict *d;
        macro *m;
        int fn;
    } u;
} value;

struct vlist {
    value *v;
    size_t n, cap;
    bool tuple;
};

struct vdict {
    value *keys, *vals;
    size_t n, cap;
    bool ns; /* a namespace(): attributes may be assigned */
};

struct node {
    int kind, op, line, col;
    const char *name; /* names (NUL-terminated); S_TEXT: text (name_len bytes) */
    size_t name_len;
    node *a, *b, *c, *d;
    node **items; /* statement bodies, arguments, list items, dict k/v pairs */
    int n_items;
    const char **kw_names; /* keyword arguments / macro parameter names */
    node **kw_vals;
    int n_kw;
    const char **targets; /* for / set targets */
    int n_targets;
    int *ops; /* E_CMP: n_items - 1 operators */
    value lit;
};

typedef struct scope {
    struct scope *parent;
    vdict vars;
    bool captured; /* a macro closes over it: it must outlive its loop iteration */
} scope;

struct macro {
    const node *def;
    scope *closure;
};

enum func_id { F_RAISE, F_NAMESPACE, F_RANGE, F_STRFTIME, F_DICT };

/* ---------------------------------------------------------------- parser */

static token *cur(jctx *c)
{
    return &c->toks[c->pos];
}

static token *peek(jctx *c, size_t k)
{
    size_t i = c->pos + k;
    return i < c->n_toks ? &c->toks[i] : &c->toks[c->n_toks - 1];
}

static void advance(jctx *c)
{
    if (c->pos + 1 < c->n_toks)
        c->pos++;
}

static bool tok_is(const token *t, int kind, const char *s)
{
    return t->kind == kind && (!s || (strlen(s) == t->n && memcmp(t->s, s, t->n) == 0));
}

static bool at_op(jctx *c, const char *op)
{
    return tok_is(cur(c), T_OP, op);
}

static bool at_name(jctx *c, const char *name)
{
    return tok_is(cur(c), T_NAME, name);
}

static const char *tok_desc(const token *t, char *buf, size_t n)
{
    switch (t->kind) {
    case T_EOF:
        return "end of template";
    case T_TEXT:
        return "text";
    case T_VAR_END:
        return "'}}'";
    case T_BLOCK_END:
        return "'%}'";
    case T_VAR_BEGIN:
        return "'{{'";
    case T_BLOCK_BEGIN:
        return "'{%'";
    case T_STRING:
        return "a string";
    default:
        snprintf(buf, n, "'%.*s'", (int)(t->n < 40 ? t->n : 40), t->s);
        return buf;
    }
}

static _Noreturn void syntax_error(jctx *c, const char *expected)
{
    char buf[64];
    token *t = cur(c);
    fail_at(c, LOOM_EFORMAT, t->line, t->col, "syntax error: expected %s, found %s", expected,
            tok_desc(t, buf, sizeof(buf)));
}

static void expect_op(jctx *c, const char *op)
{
    if (!at_op(c, op)) {
        char what[16];
        snprintf(what, sizeof(what), "'%s'", op);
        syntax_error(c, what);
    }
    advance(c);
}

static void expect_kind(jctx *c, int kind, const char *what)
{
    if (cur(c)->kind != kind)
        syntax_error(c, what);
    advance(c);
}

static node *new_node(jctx *c, int kind, const token *at)
{
    node *n = arena_alloc(c, sizeof(node));
    memset(n, 0, sizeof(*n));
    n->kind = kind;
    n->line = at->line;
    n->col = at->col;
    return n;
}

static const char *tok_name(jctx *c, const token *t)
{
    return arena_strndup(c, t->s, t->n);
}

/* Growable node-pointer array in the arena. */
typedef struct nlist {
    node **v;
    int n, cap;
} nlist;

static void nl_push(jctx *c, nlist *l, node *x)
{
    if (l->n == l->cap) {
        int cap = l->cap ? l->cap * 2 : 8;
        node **v = arena_alloc(c, (size_t)cap * sizeof(node *));
        if (l->n)
            memcpy(v, l->v, (size_t)l->n * sizeof(node *));
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = x;
}

static void enter(jctx *c, const token *at)
{
    if (++c->depth > JT_MAX_DEPTH)
        fail_at(c, LOOM_ETOOLONG, at->line, at->col, "nested more than %d levels deep",
                JT_MAX_DEPTH);
}

static node *parse_expr(jctx *c);
static node *parse_or(jctx *c);
static node *parse_unary(jctx *c, bool with_filter);
static node *parse_primary(jctx *c);
static node *parse_postfix(jctx *c, node *n);

static value v_str(const char *s, size_t n)
{
    value v = {.t = V_STR};
    v.u.s.s = s;
    v.u.s.n = n;
    return v;
}

/* Arguments of a call, filter or test: positional and keyword. */
static void parse_args(jctx *c, node *n)
{
    expect_op(c, "(");
    nlist pos = {0}, kw = {0};
    const char **names = NULL;
    int n_kw = 0, cap_kw = 0;
    while (!at_op(c, ")")) {
        if (at_op(c, "*") || at_op(c, "**")) {
            token *t = cur(c);
            fail_at(c, LOOM_EUNSUPPORTED, t->line, t->col, "*args and **kwargs are not supported");
        }
        if (cur(c)->kind == T_NAME && tok_is(peek(c, 1), T_OP, "=")) {
            if (n_kw == cap_kw) {
                cap_kw = cap_kw ? cap_kw * 2 : 4;
                const char **nn = arena_alloc(c, (size_t)cap_kw * sizeof(char *));
                if (n_kw)
                    memcpy(nn, names, (size_t)n_kw * sizeof(char *));
                names = nn;
            }
            names[n_kw++] = tok_name(c, cur(c));
            advance(c);
            advance(c);
            nl_push(c, &kw, parse_expr(c));
        } else {
            if (n_kw) {
                token *t = cur(c);
                fail_at(c, LOOM_EFORMAT, t->line, t->col,
                        "syntax error: positional argument after keyword argument");
            }
            nl_push(c, &pos, parse_expr(c));
        }
        if (!at_op(c, ","))
            break;
        advance(c);
    }
    expect_op(c, ")");
    n->items = pos.v;
    n->n_items = pos.n;
    n->kw_names = names;
    n->kw_vals = kw.v;
    n->n_kw = n_kw;
}

/* A dotted name after '|' or 'is' (filter or test name). */
static const char *parse_dotted_name(jctx *c, const char *what)
{
    if (cur(c)->kind != T_NAME)
        syntax_error(c, what);
    sbuf b = {0};
    sb_put(c, &b, cur(c)->s, cur(c)->n);
    advance(c);
    while (at_op(c, ".") && peek(c, 1)->kind == T_NAME) {
        advance(c);
        sb_put(c, &b, ".", 1);
        sb_put(c, &b, cur(c)->s, cur(c)->n);
        advance(c);
    }
    sb_put(c, &b, "", 1);
    return b.d;
}

static node *parse_filter_expr(jctx *c, node *n)
{
    for (;;) {
        token *t = cur(c);
        if (at_op(c, "|")) {
            advance(c);
            node *f = new_node(c, E_FILTER, t);
            f->a = n;
            f->name = parse_dotted_name(c, "a filter name");
            if (at_op(c, "("))
                parse_args(c, f);
            n = f;
        } else if (at_name(c, "is")) {
            advance(c);
            node *f = new_node(c, E_TEST, t);
            f->a = n;
            if (at_name(c, "not")) {
                f->op = 1;
                advance(c);
            }
            f->name = parse_dotted_name(c, "a test name");
            token *a = cur(c);
            if (at_op(c, "(")) {
                parse_args(c, f);
            } else if ((a->kind == T_NAME || a->kind == T_STRING || a->kind == T_INT ||
                        a->kind == T_FLOAT || tok_is(a, T_OP, "[") || tok_is(a, T_OP, "{")) &&
                       !tok_is(a, T_NAME, "else") && !tok_is(a, T_NAME, "or") &&
                       !tok_is(a, T_NAME, "and")) {
                node *arg = parse_postfix(c, parse_primary(c));
                f->items = arena_alloc(c, sizeof(node *));
                f->items[0] = arg;
                f->n_items = 1;
            }
            n = f;
        } else if (at_op(c, "(")) {
            node *call = new_node(c, E_CALL, t);
            call->a = n;
            parse_args(c, call);
            n = call;
        } else {
            return n;
        }
    }
}

static node *parse_postfix(jctx *c, node *n)
{
    for (;;) {
        token *t = cur(c);
        if (at_op(c, ".")) {
            advance(c);
            if (cur(c)->kind == T_NAME) {
                node *a = new_node(c, E_ATTR, t);
                a->a = n;
                a->name = tok_name(c, cur(c));
                advance(c);
                n = a;
            } else if (cur(c)->kind == T_INT) { /* x.0 is x[0] */
                node *a = new_node(c, E_ITEM, t);
                a->a = n;
                a->b = new_node(c, E_LIT, cur(c));
                a->b->lit = (value){.t = V_INT, .u.i = cur(c)->i};
                advance(c);
                n = a;
            } else {
                syntax_error(c, "an attribute name");
            }
        } else if (at_op(c, "[")) {
            advance(c);
            node *lo = NULL, *hi = NULL, *step = NULL;
            bool slice = false;
            if (!at_op(c, ":"))
                lo = parse_expr(c);
            if (at_op(c, ":")) {
                slice = true;
                advance(c);
                if (!at_op(c, "]") && !at_op(c, ":"))
                    hi = parse_expr(c);
                if (at_op(c, ":")) {
                    advance(c);
                    if (!at_op(c, "]"))
                        step = parse_expr(c);
                }
            }
            expect_op(c, "]");
            node *a = new_node(c, slice ? E_SLICE : E_ITEM, t);
            a->a = n;
            a->b = lo;
            a->c = hi;
            a->d = step;
            n = a;
        } else if (at_op(c, "(")) {
            node *call = new_node(c, E_CALL, t);
            call->a = n;
            parse_args(c, call);
            n = call;
        } else {
            return n;
        }
    }
}

static node *parse_primary(jctx *c)
{
    token *t = cur(c);
    enter(c, t);
    node *n;
    if (t->kind == T_NAME) {
        n = new_node(c, E_LIT, t);
        if (tok_is(t, T_NAME, "true") || tok_is(t, T_NAME, "True")) {
            n->lit = (value){.t = V_BOOL, .u.b = true};
        } else if (tok_is(t, T_NAME, "false") || tok_is(t, T_NAME, "False")) {
            n->lit = (value){.t = V_BOOL, .u.b = false};
        } else if (tok_is(t, T_NAME, "none") || tok_is(t, T_NAME, "None")) {
            n->lit = (value){.t = V_NONE};
        } else {
            n->kind = E_NAME;
            n->name = tok_name(c, t);
        }
        advance(c);
    } else if (t->kind == T_STRING) {
        sbuf b = {0};
        while (cur(c)->kind == T_STRING) { /* adjacent literals concatenate */
            sb_put(c, &b, cur(c)->s, cur(c)->n);
            advance(c);
        }
        n = new_node(c, E_LIT, t);
        n->lit = v_str(b.d ? b.d : "", b.n);
    } else if (t->kind == T_INT) {
        n = new_node(c, E_LIT, t);
        n->lit = (value){.t = V_INT, .u.i = t->i};
        advance(c);
    } else if (t->kind == T_FLOAT) {
        n = new_node(c, E_LIT, t);
        n->lit = (value){.t = V_FLOAT, .u.f = t->f};
        advance(c);
    } else if (at_op(c, "(")) {
        advance(c);
        if (at_op(c, ")")) { /* empty tuple */
            advance(c);
            n = new_node(c, E_TUPLE, t);
        } else {
            n = parse_expr(c);
            if (at_op(c, ",")) {
                nlist items = {0};
                nl_push(c, &items, n);
                while (at_op(c, ",")) {
                    advance(c);
                    if (at_op(c, ")"))
                        break;
                    nl_push(c, &items, parse_expr(c));
                }
                n = new_node(c, E_TUPLE, t);
                n->items = items.v;
                n->n_items = items.n;
            }
            expect_op(c, ")");
        }
    } else if (at_op(c, "[")) {
        advance(c);
        nlist items = {0};
        while (!at_op(c, "]")) {
            nl_push(c, &items, parse_expr(c));
            if (!at_op(c, ","))
                break;
            advance(c);
        }
        expect_op(c, "]");
        n = new_node(c, E_LIST, t);
        n->items = items.v;
        n->n_items = items.n;
    } else if (at_op(c, "{")) {
        advance(c);
        nlist items = {0};
        while (!at_op(c, "}")) {
            nl_push(c, &items, parse_expr(c));
            expect_op(c, ":");
            nl_push(c, &items, parse_expr(c));
            if (!at_op(c, ","))
                break;
            advance(c);
        }
        expect_op(c, "}");
        n = new_node(c, E_DICT, t);
        n->items = items.v;
        n->n_items = items.n;
    } else {
        syntax_error(c, "an expression");
    }
    c->depth--;
    return n;
}

static node *parse_unary(jctx *c, bool with_filter)
{
    token *t = cur(c);
    enter(c, t);
    node *n;
    if (at_op(c, "-") || at_op(c, "+")) {
        advance(c);
        n = new_node(c, tok_is(t, T_OP, "-") ? E_NEG : E_POS, t);
        n->a = parse_unary(c, false);
    } else {
        n = parse_postfix(c, parse_primary(c));
    }
    if (with_filter)
        n = parse_filter_expr(c, n);
    c->depth--;
    return n;
}

static node *binary(jctx *c, const token *t, int op, node *a, node *b)
{
    node *n = new_node(c, E_BIN, t);
    n->op = op;
    n->a = a;
    n->b = b;
    return n;
}

static node *parse_pow(jctx *c)
{
    node *n = parse_unary(c, true);
    while (at_op(c, "**")) {
        token *t = cur(c);
        advance(c);
        n = binary(c, t, OP_POW, n, parse_unary(c, true));
    }
    return n;
}

static node *parse_math2(jctx *c)
{
    node *n = parse_pow(c);
    for (;;) {
        token *t = cur(c);
        int op = at_op(c, "*")    ? OP_MUL
                 : at_op(c, "/")  ? OP_DIV
                 : at_op(c, "//") ? OP_FLOORDIV
                 : at_op(c, "%")  ? OP_MOD
                                  : -1;
        if (op < 0)
            return n;
        advance(c);
        n = binary(c, t, op, n, parse_pow(c));
    }
}

static node *parse_concat(jctx *c)
{
    node *n = parse_math2(c);
    while (at_op(c, "~")) {
        token *t = cur(c);
        advance(c);
        n = binary(c, t, OP_CONCAT, n, parse_math2(c));
    }
    return n;
}

static node *parse_math1(jctx *c)
{
    node *n = parse_concat(c);
    for (;;) {
        token *t = cur(c);
        int op = at_op(c, "+") ? OP_ADD : at_op(c, "-") ? OP_SUB : -1;
        if (op < 0)
            return n;
        advance(c);
        n = binary(c, t, op, n, parse_concat(c));
    }
}

static node *parse_compare(jctx *c)
{
    token *t0 = cur(c);
    node *first = parse_math1(c);
    nlist operands = {0};
    int *ops = NULL, n_ops = 0;
    for (;;) {
        int op;
        if (at_op(c, "=="))
            op = CMP_EQ;
        else if (at_op(c, "!="))
            op = CMP_NE;
        else if (at_op(c, "<"))
            op = CMP_LT;
        else if (at_op(c, ">"))
            op = CMP_GT;
        else if (at_op(c, "<="))
            op = CMP_LE;
        else if (at_op(c, ">="))
            op = CMP_GE;
        else if (at_name(c, "in"))
            op = CMP_IN;
        else if (at_name(c, "not") && tok_is(peek(c, 1), T_NAME, "in")) {
            op = CMP_NOT_IN;
            advance(c);
        } else
            break;
        advance(c);
        if (!operands.n)
            nl_push(c, &operands, first);
        int *nops = arena_alloc(c, (size_t)(n_ops + 1) * sizeof(int));
        if (n_ops)
            memcpy(nops, ops, (size_t)n_ops * sizeof(int));
        ops = nops;
        ops[n_ops++] = op;
        nl_push(c, &operands, parse_math1(c));
    }
    if (!n_ops)
        return first;
    node *n = new_node(c, E_CMP, t0);
    n->items = operands.v;
    n->n_items = operands.n;
    n->ops = ops;
    return n;
}

static node *parse_not(jctx *c)
{
    token *t = cur(c);
    if (at_name(c, "not")) {
        enter(c, t);
        advance(c);
        node *n = new_node(c, E_NOT, t);
        n->a = parse_not(c);
        c->depth--;
        return n;
    }
    return parse_compare(c);
}

static node *parse_and(jctx *c)
{
    node *n = parse_not(c);
    while (at_name(c, "and")) {
        token *t = cur(c);
        advance(c);
        node *x = new_node(c, E_AND, t);
        x->a = n;
        x->b = parse_not(c);
        n = x;
    }
    return n;
}

static node *parse_or(jctx *c)
{
    node *n = parse_and(c);
    while (at_name(c, "or")) {
        token *t = cur(c);
        advance(c);
        node *x = new_node(c, E_OR, t);
        x->a = n;
        x->b = parse_and(c);
        n = x;
    }
    return n;
}

/* expr: or-expression with an optional inline `x if cond else y`. */
static node *parse_expr(jctx *c)
{
    token *t = cur(c);
    enter(c, t);
    node *n = parse_or(c);
    while (at_name(c, "if")) {
        token *it = cur(c);
        advance(c);
        node *x = new_node(c, E_COND, it);
        x->a = n;
        x->b = parse_or(c);
        if (at_name(c, "else")) {
            advance(c);
            x->c = parse_expr(c);
        }
        n = x;
    }
    c->depth--;
    return n;
}

/* An expression, or a bare tuple `a, b` (right side of set). */
static node *parse_tuple_expr(jctx *c)
{
    token *t = cur(c);
    node *n = parse_expr(c);
    if (!at_op(c, ","))
        return n;
    nlist items = {0};
    nl_push(c, &items, n);
    while (at_op(c, ",")) {
        advance(c);
        if (cur(c)->kind == T_BLOCK_END || cur(c)->kind == T_VAR_END)
            break;
        nl_push(c, &items, parse_expr(c));
    }
    node *tup = new_node(c, E_TUPLE, t);
    tup->items = items.v;
    tup->n_items = items.n;
    return tup;
}

/* Names of a for/set target list: a or a, b or (a, b). */
static void parse_targets(jctx *c, node *n)
{
    bool paren = at_op(c, "(");
    if (paren)
        advance(c);
    const char **names = NULL;
    int count = 0;
    for (;;) {
        if (cur(c)->kind != T_NAME)
            syntax_error(c, "a variable name");
        const char **nn = arena_alloc(c, (size_t)(count + 1) * sizeof(char *));
        if (count)
            memcpy(nn, names, (size_t)count * sizeof(char *));
        names = nn;
        names[count++] = tok_name(c, cur(c));
        advance(c);
        if (!at_op(c, ","))
            break;
        advance(c);
    }
    if (paren)
        expect_op(c, ")");
    n->targets = names;
    n->n_targets = count;
}

static node *parse_body(jctx *c, const char *const *stops, const token *opener);

/* After a body: consume "{% name" for the stop that ended it; returns that name. */
static const char *body_stop(jctx *c)
{
    advance(c); /* {% */
    const char *name = tok_name(c, cur(c));
    advance(c);
    return name;
}

static node *parse_if(jctx *c, const token *open)
{
    enter(c, open); /* each elif nests one level */
    node *n = new_node(c, S_IF, open);
    n->a = parse_expr(c);
    expect_kind(c, T_BLOCK_END, "'%}'");
    static const char *const stops[] = {"elif", "else", "endif", NULL};
    n->b = parse_body(c, stops, open);
    token *at = cur(c);
    const char *stop = body_stop(c);
    if (strcmp(stop, "elif") == 0) {
        n->c = parse_if(c, at);
        c->depth--;
        return n;
    }
    if (strcmp(stop, "else") == 0) {
        expect_kind(c, T_BLOCK_END, "'%}'");
        static const char *const end[] = {"endif", NULL};
        n->c = parse_body(c, end, open);
        body_stop(c);
    }
    expect_kind(c, T_BLOCK_END, "'%}'");
    c->depth--;
    return n;
}

static node *parse_for(jctx *c, const token *open)
{
    node *n = new_node(c, S_FOR, open);
    parse_targets(c, n);
    if (!at_name(c, "in"))
        syntax_error(c, "'in'");
    advance(c);
    n->a = parse_or(c); /* no inline if: `for x in xs if cond` filters */
    if (at_name(c, "if")) {
        advance(c);
        n->b = parse_expr(c);
    }
    if (at_name(c, "recursive")) {
        token *t = cur(c);
        fail_at(c, LOOM_EUNSUPPORTED, t->line, t->col, "recursive for loops are not supported");
    }
    expect_kind(c, T_BLOCK_END, "'%}'");
    static const char *const stops[] = {"else", "endfor", NULL};
    c->loop_depth++;
    n->c = parse_body(c, stops, open);
    c->loop_depth--;
    const char *stop = body_stop(c);
    if (strcmp(stop, "else") == 0) {
        expect_kind(c, T_BLOCK_END, "'%}'");
        static const char *const end[] = {"endfor", NULL};
        n->d = parse_body(c, end, open);
        body_stop(c);
    }
    expect_kind(c, T_BLOCK_END, "'%}'");
    return n;
}

static node *parse_set(jctx *c, const token *open)
{
    node *n = new_node(c, S_SET, open);
    if (cur(c)->kind == T_NAME && tok_is(peek(c, 1), T_OP, ".")) { /* ns.attr = ... */
        n->kind = S_SET_ATTR;
        n->name = tok_name(c, cur(c));
        advance(c);
        advance(c);
        if (cur(c)->kind != T_NAME)
            syntax_error(c, "an attribute name");
        const char **t = arena_alloc(c, sizeof(char *));
        t[0] = tok_name(c, cur(c));
        n->targets = t;
        n->n_targets = 1;
        advance(c);
        expect_op(c, "=");
        n->a = parse_tuple_expr(c);
        expect_kind(c, T_BLOCK_END, "'%}'");
        return n;
    }
    parse_targets(c, n);
    if (at_op(c, "=")) {
        advance(c);
        n->a = parse_tuple_expr(c);
        expect_kind(c, T_BLOCK_END, "'%}'");
        return n;
    }
    if (n->n_targets != 1 || cur(c)->kind != T_BLOCK_END) {
        if (at_op(c, "|")) {
            token *t = cur(c);
            fail_at(c, LOOM_EUNSUPPORTED, t->line, t->col,
                    "filtered {%% set %%} blocks are not "
                    "supported");
        }
        syntax_error(c, "'=' or '%}'");
    }
    advance(c);
    n->kind = S_SET_BLOCK;
    static const char *const stops[] = {"endset", NULL};
    n->b = parse_body(c, stops, open);
    body_stop(c);
    expect_kind(c, T_BLOCK_END, "'%}'");
    return n;
}

static node *parse_macro(jctx *c, const token *open)
{
    node *n = new_node(c, S_MACRO, open);
    if (cur(c)->kind != T_NAME)
        syntax_error(c, "a macro name");
    n->name = tok_name(c, cur(c));
    advance(c);
    expect_op(c, "(");
    nlist defaults = {0};
    const char **names = NULL;
    int count = 0;
    while (!at_op(c, ")")) {
        if (cur(c)->kind != T_NAME)
            syntax_error(c, "a parameter name");
        const char **nn = arena_alloc(c, (size_t)(count + 1) * sizeof(char *));
        if (count)
            memcpy(nn, names, (size_t)count * sizeof(char *));
        names = nn;
        names[count++] = tok_name(c, cur(c));
        advance(c);
        node *def = NULL;
        if (at_op(c, "=")) {
            advance(c);
            def = parse_expr(c);
        }
        nl_push(c, &defaults, def);
        if (!at_op(c, ","))
            break;
        advance(c);
    }
    expect_op(c, ")");
    expect_kind(c, T_BLOCK_END, "'%}'");
    n->kw_names = names;
    n->kw_vals = defaults.v;
    n->n_kw = count;
    static const char *const stops[] = {"endmacro", NULL};
    int saved = c->loop_depth;
    c->loop_depth = 0;
    n->b = parse_body(c, stops, open);
    c->loop_depth = saved;
    body_stop(c);
    expect_kind(c, T_BLOCK_END, "'%}'");
    return n;
}

static node *parse_statement(jctx *c)
{
    token *open = cur(c); /* {% */
    advance(c);
    token *kw = cur(c);
    if (kw->kind != T_NAME)
        syntax_error(c, "a statement name");
    advance(c);
    enter(c, kw);
    node *n;
    if (tok_is(kw, T_NAME, "if")) {
        n = parse_if(c, open);
    } else if (tok_is(kw, T_NAME, "for")) {
        n = parse_for(c, open);
    } else if (tok_is(kw, T_NAME, "set")) {
        n = parse_set(c, open);
    } else if (tok_is(kw, T_NAME, "macro")) {
        n = parse_macro(c, open);
    } else if (tok_is(kw, T_NAME, "break") || tok_is(kw, T_NAME, "continue")) {
        if (c->loop_depth == 0)
            fail_at(c, LOOM_EFORMAT, kw->line, kw->col, "syntax error: '%.*s' outside a loop",
                    (int)kw->n, kw->s);
        n = new_node(c, tok_is(kw, T_NAME, "break") ? S_BREAK : S_CONTINUE, open);
        expect_kind(c, T_BLOCK_END, "'%}'");
    } else if (tok_is(kw, T_NAME, "generation")) { /* transformers' assistant-mask marker */
        expect_kind(c, T_BLOCK_END, "'%}'");
        static const char *const stops[] = {"endgeneration", NULL};
        n = parse_body(c, stops, open);
        body_stop(c);
        expect_kind(c, T_BLOCK_END, "'%}'");
    } else {
        static const char *const ends[] = {"endif", "endfor", "endset",        "endmacro",
                                           "elif",  "else",   "endgeneration", NULL};
        for (int i = 0; ends[i]; i++)
            if (tok_is(kw, T_NAME, ends[i]))
                fail_at(c, LOOM_EFORMAT, kw->line, kw->col, "syntax error: unexpected '%s'",
                        ends[i]);
        fail_at(c, LOOM_EUNSUPPORTED, kw->line, kw->col, "unsupported statement '%.*s'",
                (int)(kw->n < 40 ? kw->n : 40), kw->s);
    }
    c->depth--;
    return n;
}

/* Statements up to EOF (stops == NULL) or up to a "{% stop" (left unconsumed). */
static node *parse_body(jctx *c, const char *const *stops, const token *opener)
{
    nlist items = {0};
    node *body = new_node(c, S_BODY, cur(c));
    for (;;) {
        token *t = cur(c);
        if (t->kind == T_EOF) {
            if (stops) {
                const char *end = stops[0];
                for (int i = 0; stops[i]; i++)
                    if (strncmp(stops[i], "end", 3) == 0)
                        end = stops[i];
                fail_at(c, LOOM_EFORMAT, opener->line, opener->col,
                        "syntax error: this block is never closed (expected '{%% %s %%}')", end);
            }
            break;
        }
        if (t->kind == T_TEXT) {
            node *n = new_node(c, S_TEXT, t);
            n->name = t->s;
            n->name_len = t->n;
            nl_push(c, &items, n);
            advance(c);
        } else if (t->kind == T_VAR_BEGIN) {
            advance(c);
            node *n = new_node(c, S_OUTPUT, t);
            n->a = parse_tuple_expr(c);
            expect_kind(c, T_VAR_END, "'}}'");
            nl_push(c, &items, n);
        } else if (t->kind == T_BLOCK_BEGIN) {
            token *kw = peek(c, 1);
            bool stop = false;
            for (int i = 0; stops && stops[i]; i++)
                if (tok_is(kw, T_NAME, stops[i]))
                    stop = true;
            if (stop)
                break;
            nl_push(c, &items, parse_statement(c));
        } else {
            syntax_error(c, "text or a tag");
        }
    }
    body->items = items.v;
    body->n_items = items.n;
    return body;
}

/* ---------------------------------------------------------------- values */

static value v_undef(void)
{
    return (value){.t = V_UNDEF};
}

static value v_none(void)
{
    return (value){.t = V_NONE};
}

static value v_bool(bool b)
{
    return (value){.t = V_BOOL, .u.b = b};
}

static value v_int(int64_t i)
{
    return (value){.t = V_INT, .u.i = i};
}

static value v_float(double f)
{
    return (value){.t = V_FLOAT, .u.f = f};
}

static value v_cstr(const char *s)
{
    return v_str(s, strlen(s));
}

static vlist *list_new(jctx *c, size_t cap)
{
    vlist *l = arena_alloc(c, sizeof(vlist));
    memset(l, 0, sizeof(*l));
    if (cap) {
        l->v = arena_alloc(c, cap * sizeof(value));
        l->cap = cap;
    }
    return l;
}

static void list_push(jctx *c, vlist *l, value v)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        value *nv = arena_alloc(c, cap * sizeof(value));
        if (l->n)
            memcpy(nv, l->v, l->n * sizeof(value));
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
}

static value v_list(vlist *l)
{
    return (value){.t = V_LIST, .u.l = l};
}

static vdict *dict_new_cap(jctx *c, size_t cap)
{
    vdict *d = arena_alloc(c, sizeof(vdict));
    memset(d, 0, sizeof(*d));
    if (cap) {
        d->keys = arena_alloc(c, cap * sizeof(value));
        d->vals = arena_alloc(c, cap * sizeof(value));
        d->cap = cap;
    }
    return d;
}

static vdict *dict_new(jctx *c)
{
    return dict_new_cap(c, 0);
}

static value v_dict(vdict *d)
{
    return (value){.t = V_DICT, .u.d = d};
}

static bool values_equal_depth(jctx *c, const value *a, const value *b, int depth);

static bool values_equal(jctx *c, const value *a, const value *b)
{
    return values_equal_depth(c, a, b, 0);
}

static value *dict_find(jctx *c, vdict *d, const value *key)
{
    charge(c, d->n);
    for (size_t i = 0; i < d->n; i++)
        if (values_equal(c, &d->keys[i], key))
            return &d->vals[i];
    return NULL;
}

static value *dict_find_str(jctx *c, vdict *d, const char *key, size_t n)
{
    charge(c, d->n);
    for (size_t i = 0; i < d->n; i++)
        if (d->keys[i].t == V_STR && d->keys[i].u.s.n == n && memcmp(d->keys[i].u.s.s, key, n) == 0)
            return &d->vals[i];
    return NULL;
}

static void dict_set(jctx *c, vdict *d, value key, value val)
{
    value *slot = dict_find(c, d, &key);
    if (slot) {
        *slot = val;
        return;
    }
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 4;
        value *k = arena_alloc(c, cap * sizeof(value)), *v = arena_alloc(c, cap * sizeof(value));
        if (d->n) {
            memcpy(k, d->keys, d->n * sizeof(value));
            memcpy(v, d->vals, d->n * sizeof(value));
        }
        d->keys = k;
        d->vals = v;
        d->cap = cap;
    }
    d->keys[d->n] = key;
    d->vals[d->n++] = val;
}

static void dict_set_str(jctx *c, vdict *d, const char *key, value val)
{
    dict_set(c, d, v_cstr(key), val);
}

static bool truthy(const value *v)
{
    switch (v->t) {
    case V_BOOL:
        return v->u.b;
    case V_INT:
        return v->u.i != 0;
    case V_FLOAT:
        return v->u.f != 0;
    case V_STR:
        return v->u.s.n > 0;
    case V_LIST:
        return v->u.l->n > 0;
    case V_DICT:
        return v->u.d->n > 0;
    case V_MACRO:
    case V_FUNC:
        return true;
    default:
        return false;
    }
}

static bool is_number(const value *v)
{
    return v->t == V_INT || v->t == V_FLOAT || v->t == V_BOOL;
}

static double num_f(const value *v)
{
    return v->t == V_FLOAT ? v->u.f : v->t == V_INT ? (double)v->u.i : (double)v->u.b;
}

static int64_t num_i(const value *v)
{
    return v->t == V_INT ? v->u.i : v->t == V_BOOL ? v->u.b : (int64_t)v->u.f;
}

/* Python ==; depth bounds the walk through self-containing namespaces. */
static bool values_equal_depth(jctx *c, const value *a, const value *b, int depth)
{
    if (depth > JT_MAX_DEPTH)
        return false;
    if (is_number(a) && is_number(b)) {
        if (a->t != V_FLOAT && b->t != V_FLOAT)
            return num_i(a) == num_i(b);
        return num_f(a) == num_f(b);
    }
    if (a->t != b->t)
        return false;
    switch (a->t) {
    case V_UNDEF:
    case V_NONE:
        return true;
    case V_STR:
        charge(c, a->u.s.n);
        return a->u.s.n == b->u.s.n && memcmp(a->u.s.s, b->u.s.s, a->u.s.n) == 0;
    case V_LIST:
        if (a->u.l->n != b->u.l->n || a->u.l->tuple != b->u.l->tuple)
            return false;
        for (size_t i = 0; i < a->u.l->n; i++)
            if (!values_equal_depth(c, &a->u.l->v[i], &b->u.l->v[i], depth + 1))
                return false;
        return true;
    case V_DICT:
        if (a->u.d->n != b->u.d->n)
            return false;
        for (size_t i = 0; i < a->u.d->n; i++) {
            const value *o = NULL;
            for (size_t k = 0; k < b->u.d->n && !o; k++)
                if (values_equal_depth(c, &a->u.d->keys[i], &b->u.d->keys[k], depth + 1))
                    o = &b->u.d->vals[k];
            if (!o || !values_equal_depth(c, &a->u.d->vals[i], o, depth + 1))
                return false;
        }
        return true;
    case V_MACRO:
        return a->u.m == b->u.m;
    case V_FUNC:
        return a->u.fn == b->u.fn;
    default:
        return false;
    }
}

static const char *type_name(const value *v)
{
    static const char *names[] = {"undefined", "none", "bool", "int",   "float",
                                  "string",    "list", "dict", "macro", "function"};
    if (v->t == V_LIST && v->u.l->tuple)
        return "tuple";
    return names[v->t];
}

/* Python's repr(float): the shortest digits that read back the same. */
static void format_float(jctx *c, sbuf *b, double f, bool json)
{
    if (isnan(f)) {
        sb_puts(c, b, json ? "NaN" : "nan");
        return;
    }
    if (isinf(f)) {
        sb_puts(c, b, f > 0 ? (json ? "Infinity" : "inf") : (json ? "-Infinity" : "-inf"));
        return;
    }
    char tmp[40];
    int prec;
    for (prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f)
            break;
    }
    /* tmp = [-]d.ddde[+-]XX: split digits and exponent */
    char digits[24];
    int nd = 0, exp10;
    const char *p = tmp;
    bool neg = *p == '-';
    if (neg)
        p++;
    for (; *p && *p != 'e'; p++)
        if (*p != '.')
            digits[nd++] = *p;
    exp10 = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = 0;
    if (neg)
        sb_put(c, b, "-", 1);
    if (exp10 >= -4 && exp10 < 16) {
        if (exp10 < 0) {
            sb_puts(c, b, "0.");
            for (int i = 0; i < -exp10 - 1; i++)
                sb_put(c, b, "0", 1);
            sb_put(c, b, digits, (size_t)nd);
        } else {
            for (int i = 0; i <= exp10; i++)
                sb_put(c, b, i < nd ? &digits[i] : "0", 1);
            sb_put(c, b, ".", 1);
            if (nd > exp10 + 1)
                sb_put(c, b, digits + exp10 + 1, (size_t)(nd - exp10 - 1));
            else
                sb_put(c, b, "0", 1);
        }
    } else {
        sb_put(c, b, digits, 1);
        if (nd > 1) {
            sb_put(c, b, ".", 1);
            sb_put(c, b, digits + 1, (size_t)(nd - 1));
        }
        sb_printf(c, b, "e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
    }
}

static void format_value(jctx *c, sbuf *b, const value *v, bool repr);

static void format_repr_str(jctx *c, sbuf *b, const char *s, size_t n)
{
    bool has_single = memchr(s, '\'', n) != NULL, has_double = memchr(s, '"', n) != NULL;
    char q = has_single && !has_double ? '"' : '\'';
    sb_put(c, b, &q, 1);
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '\\' || ch == (unsigned char)q) {
            sb_put(c, b, "\\", 1);
            sb_put(c, b, &s[i], 1);
        } else if (ch == '\n') {
            sb_puts(c, b, "\\n");
        } else if (ch == '\r') {
            sb_puts(c, b, "\\r");
        } else if (ch == '\t') {
            sb_puts(c, b, "\\t");
        } else if (ch < 0x20 || ch == 0x7F) {
            sb_printf(c, b, "\\x%02x", ch);
        } else {
            sb_put(c, b, &s[i], 1);
        }
    }
    sb_put(c, b, &q, 1);
}

/* str(v) (repr=false) or repr(v), as Python prints them. */
static void format_value(jctx *c, sbuf *b, const value *v, bool repr)
{
    switch (v->t) {
    case V_UNDEF:
        if (repr)
            sb_puts(c, b, "Undefined");
        break;
    case V_NONE:
        sb_puts(c, b, "None");
        break;
    case V_BOOL:
        sb_puts(c, b, v->u.b ? "True" : "False");
        break;
    case V_INT:
        sb_printf(c, b, "%lld", (long long)v->u.i);
        break;
    case V_FLOAT:
        format_float(c, b, v->u.f, false);
        break;
    case V_STR:
        if (repr)
            format_repr_str(c, b, v->u.s.s, v->u.s.n);
        else
            sb_put(c, b, v->u.s.s, v->u.s.n);
        break;
    case V_LIST: {
        vlist *l = v->u.l;
        sb_put(c, b, l->tuple ? "(" : "[", 1);
        for (size_t i = 0; i < l->n; i++) {
            if (i)
                sb_puts(c, b, ", ");
            enter(c, &(token){0});
            format_value(c, b, &l->v[i], true);
            c->depth--;
        }
        if (l->tuple && l->n == 1)
            sb_put(c, b, ",", 1);
        sb_put(c, b, l->tuple ? ")" : "]", 1);
        break;
    }
    case V_DICT: {
        vdict *d = v->u.d;
        sb_put(c, b, "{", 1);
        for (size_t i = 0; i < d->n; i++) {
            if (i)
                sb_puts(c, b, ", ");
            enter(c, &(token){0});
            format_value(c, b, &d->keys[i], true);
            sb_puts(c, b, ": ");
            format_value(c, b, &d->vals[i], true);
            c->depth--;
        }
        sb_put(c, b, "}", 1);
        break;
    }
    case V_MACRO:
        sb_puts(c, b, "<macro>");
        break;
    case V_FUNC:
        sb_puts(c, b, "<function>");
        break;
    }
}

static value to_str(jctx *c, const value *v)
{
    if (v->t == V_STR)
        return *v;
    sbuf b = {0};
    format_value(c, &b, v, false);
    return v_str(b.d ? b.d : "", b.n);
}

/* json.dumps(v, ensure_ascii, indent, separators, sort_keys) */
typedef struct json_opts {
    int indent; /* < 0: none */
    const char *item_sep, *key_sep;
    bool ensure_ascii, sort_keys;
} json_opts;

static void json_string(jctx *c, sbuf *b, const char *s, size_t n, bool ensure_ascii)
{
    sb_put(c, b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char ch = (unsigned char)s[i];
        const char *esc = ch == '"'    ? "\\\""
                          : ch == '\\' ? "\\\\"
                          : ch == '\n' ? "\\n"
                          : ch == '\r' ? "\\r"
                          : ch == '\t' ? "\\t"
                          : ch == '\b' ? "\\b"
                          : ch == '\f' ? "\\f"
                                       : NULL;
        if (esc) {
            sb_puts(c, b, esc);
            i++;
        } else if (ch < 0x20 || (ensure_ascii && ch == 0x7F)) {
            sb_printf(c, b, "\\u%04x", ch);
            i++;
        } else if (ch >= 0x80 && ensure_ascii) {
            int k = tok_utf8_char((const unsigned char *)s + i, n - i);
            uint32_t cp = 0xFFFD;
            if (k >= 2) {
                cp = ch & (0x7F >> k);
                for (int j = 1; j < k; j++)
                    cp = (cp << 6) | ((unsigned char)s[i + j] & 0x3F);
            }
            if (cp >= 0x10000) {
                cp -= 0x10000;
                sb_printf(c, b, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
            } else {
                sb_printf(c, b, "\\u%04x", cp);
            }
            i += k > 0 ? (size_t)k : (size_t)(k < 0 ? -k : 1);
        } else {
            sb_put(c, b, &s[i], 1);
            i++;
        }
    }
    sb_put(c, b, "\"", 1);
}

static int cmp_values(jctx *c, const value *a, const value *b, const node *at);

static void json_newline(jctx *c, sbuf *b, const json_opts *o, int level)
{
    sb_put(c, b, "\n", 1);
    for (int i = 0; i < o->indent * level; i++)
        sb_put(c, b, " ", 1);
}

static void to_json(jctx *c, sbuf *b, const value *v, const json_opts *o, int level, const node *at)
{
    enter(c, &(token){.line = at->line, .col = at->col});
    switch (v->t) {
    case V_UNDEF:
    case V_NONE:
        sb_puts(c, b, "null");
        break;
    case V_BOOL:
        sb_puts(c, b, v->u.b ? "true" : "false");
        break;
    case V_INT:
        sb_printf(c, b, "%lld", (long long)v->u.i);
        break;
    case V_FLOAT:
        format_float(c, b, v->u.f, true);
        break;
    case V_STR:
        json_string(c, b, v->u.s.s, v->u.s.n, o->ensure_ascii);
        break;
    case V_LIST: {
        vlist *l = v->u.l;
        sb_put(c, b, "[", 1);
        for (size_t i = 0; i < l->n; i++) {
            if (i)
                sb_puts(c, b, o->item_sep);
            if (o->indent >= 0)
                json_newline(c, b, o, level + 1);
            to_json(c, b, &l->v[i], o, level + 1, at);
        }
        if (o->indent >= 0 && l->n)
            json_newline(c, b, o, level);
        sb_put(c, b, "]", 1);
        break;
    }
    case V_DICT: {
        vdict *d = v->u.d;
        size_t *order = arena_alloc(c, (d->n + 1) * sizeof(size_t));
        for (size_t i = 0; i < d->n; i++)
            order[i] = i;
        if (o->sort_keys) /* insertion sort: dicts in templates are small */
            for (size_t i = 1; i < d->n; i++)
                for (size_t j = i;
                     j > 0 && cmp_values(c, &d->keys[order[j - 1]], &d->keys[order[j]], at) > 0;
                     j--) {
                    size_t tmp = order[j];
                    order[j] = order[j - 1];
                    order[j - 1] = tmp;
                }
        sb_put(c, b, "{", 1);
        for (size_t k = 0; k < d->n; k++) {
            size_t i = order[k];
            if (k)
                sb_puts(c, b, o->item_sep);
            if (o->indent >= 0)
                json_newline(c, b, o, level + 1);
            value key = d->keys[i].t == V_STR ? d->keys[i] : to_str(c, &d->keys[i]);
            if (d->keys[i].t == V_NONE)
                key = v_cstr("null");
            else if (d->keys[i].t == V_BOOL)
                key = v_cstr(d->keys[i].u.b ? "true" : "false");
            json_string(c, b, key.u.s.s, key.u.s.n, o->ensure_ascii);
            sb_puts(c, b, o->key_sep);
            to_json(c, b, &d->vals[i], o, level + 1, at);
        }
        if (o->indent >= 0 && d->n)
            json_newline(c, b, o, level);
        sb_put(c, b, "}", 1);
        break;
    }
    default:
        fail_at(c, LOOM_EINVAL, at->line, at->col, "tojson: a %s is not JSON serializable",
                type_name(v));
    }
    c->depth--;
}

/* ---------------------------------------------------------------- evaluation */

static value eval(jctx *c, scope *s, const node *n);

static _Noreturn void rt_error(jctx *c, const node *at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static _Noreturn void rt_error(jctx *c, const node *at, const char *fmt, ...)
{
    char msg[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fail_at(c, LOOM_EINVAL, at->line, at->col, "%s", msg);
}

static _Noreturn void unsupported(jctx *c, const node *at, const char *what, const char *name)
{
    fail_at(c, LOOM_EUNSUPPORTED, at->line, at->col, "unsupported %s '%s'", what, name);
}

static void step(jctx *c, const node *at)
{
    if (++c->steps > JT_MAX_STEPS)
        fail_at(c, LOOM_ETOOLONG, at->line, at->col, "rendering took more than %ld steps",
                JT_MAX_STEPS);
}

static value lookup(jctx *c, scope *s, const char *name)
{
    size_t n = strlen(name);
    for (; s; s = s->parent) {
        value *v = dict_find_str(c, &s->vars, name, n);
        if (v)
            return *v;
    }
    return v_undef();
}

static scope *scope_new(jctx *c, scope *parent)
{
    scope *s = arena_alloc(c, sizeof(scope));
    memset(s, 0, sizeof(*s));
    s->parent = parent;
    return s;
}

static int cmp_values(jctx *c, const value *a, const value *b, const node *at)
{
    charge(c, 256); /* one step: sorting is quadratic here */
    if (is_number(a) && is_number(b)) {
        if (a->t != V_FLOAT && b->t != V_FLOAT)
            return num_i(a) < num_i(b) ? -1 : num_i(a) > num_i(b);
        double x = num_f(a), y = num_f(b);
        return x < y ? -1 : x > y;
    }
    if (a->t == V_STR && b->t == V_STR) {
        size_t n = a->u.s.n < b->u.s.n ? a->u.s.n : b->u.s.n;
        charge(c, n);
        int r = memcmp(a->u.s.s, b->u.s.s, n);
        if (r)
            return r < 0 ? -1 : 1;
        return a->u.s.n < b->u.s.n ? -1 : a->u.s.n > b->u.s.n;
    }
    if (a->t == V_LIST && b->t == V_LIST) {
        for (size_t i = 0; i < a->u.l->n && i < b->u.l->n; i++) {
            int r = cmp_values(c, &a->u.l->v[i], &b->u.l->v[i], at);
            if (r)
                return r;
        }
        return a->u.l->n < b->u.l->n ? -1 : a->u.l->n > b->u.l->n;
    }
    rt_error(c, at, "cannot compare a %s with a %s", type_name(a), type_name(b));
}

/* Jinja's sort/min/max/unique compare strings case-insensitively unless case_sensitive=true
 * (ASCII case folding here). */
static int cmp_fold(jctx *c, const value *a, const value *b, bool fold, const node *at)
{
    if (!fold || a->t != V_STR || b->t != V_STR)
        return cmp_values(c, a, b, at);
    size_t n = a->u.s.n < b->u.s.n ? a->u.s.n : b->u.s.n;
    for (size_t i = 0; i < n; i++) {
        unsigned char x = (unsigned char)a->u.s.s[i], y = (unsigned char)b->u.s.s[i];
        if (x >= 'A' && x <= 'Z')
            x |= 0x20;
        if (y >= 'A' && y <= 'Z')
            y |= 0x20;
        if (x != y)
            return x < y ? -1 : 1;
    }
    return a->u.s.n < b->u.s.n ? -1 : a->u.s.n > b->u.s.n;
}

/* Number of code points of a UTF-8 string. */
static size_t utf8_count(jctx *c, const char *s, size_t n)
{
    charge(c, n);
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)s[i] & 0xC0) != 0x80)
            k++;
    return k;
}

/* Byte offset of code point index cp (clamped to the end). */
static size_t utf8_offset(jctx *c, const char *s, size_t n, size_t cp)
{
    charge(c, cp);
    size_t i = 0;
    while (i < n && cp > 0) {
        i++;
        while (i < n && ((unsigned char)s[i] & 0xC0) == 0x80)
            i++;
        cp--;
    }
    return i;
}

static bool contains(jctx *c, const value *needle, const value *hay, const node *at)
{
    switch (hay->t) {
    case V_STR:
        if (needle->t != V_STR)
            rt_error(c, at, "'in <string>' requires a string on the left, not a %s",
                     type_name(needle));
        charge(c, hay->u.s.n);
        return needle->u.s.n == 0 ||
               memmem(hay->u.s.s, hay->u.s.n, needle->u.s.s, needle->u.s.n) != NULL;
    case V_LIST:
        charge(c, hay->u.l->n);
        for (size_t i = 0; i < hay->u.l->n; i++)
            if (values_equal(c, needle, &hay->u.l->v[i]))
                return true;
        return false;
    case V_DICT:
        return dict_find(c, hay->u.d, needle) != NULL;
    case V_UNDEF:
        return false;
    default:
        rt_error(c, at, "a %s is not a container for 'in'", type_name(hay));
    }
}

static value concat_str(jctx *c, const value *a, const value *b)
{
    value x = a->t == V_UNDEF ? v_cstr("") : to_str(c, a);
    value y = b->t == V_UNDEF ? v_cstr("") : to_str(c, b);
    if (x.u.s.n + y.u.s.n > JT_MAX_OUTPUT)
        fail_at(c, LOOM_ETOOLONG, 0, 0, "string longer than %u MiB", JT_MAX_OUTPUT >> 20);
    char *p = arena_alloc(c, x.u.s.n + y.u.s.n + 1);
    memcpy(p, x.u.s.s, x.u.s.n);
    memcpy(p + x.u.s.n, y.u.s.s, y.u.s.n);
    p[x.u.s.n + y.u.s.n] = 0;
    return v_str(p, x.u.s.n + y.u.s.n);
}

static value repeat(jctx *c, const value *seq, int64_t times, const node *at)
{
    if (times < 0)
        times = 0;
    if (seq->t == V_STR) {
        size_t total;
        if (!loom_mul_ok(seq->u.s.n, (size_t)times, &total) || total > JT_MAX_OUTPUT)
            rt_error(c, at, "string repetition too long");
        char *p = arena_alloc(c, total + 1);
        for (int64_t i = 0; i < times; i++)
            memcpy(p + (size_t)i * seq->u.s.n, seq->u.s.s, seq->u.s.n);
        p[total] = 0;
        return v_str(p, total);
    }
    size_t total;
    if (!loom_mul_ok(seq->u.l->n, (size_t)times, &total) || total > (1u << 20))
        rt_error(c, at, "list repetition too long");
    vlist *l = list_new(c, total);
    for (int64_t i = 0; i < times; i++)
        for (size_t k = 0; k < seq->u.l->n; k++)
            list_push(c, l, seq->u.l->v[k]);
    l->tuple = seq->u.l->tuple;
    return v_list(l);
}

static value arith(jctx *c, int op, const value *a, const value *b, const node *at)
{
    if (op == OP_CONCAT)
        return concat_str(c, a, b);
    if (op == OP_ADD) {
        if ((a->t == V_STR || a->t == V_UNDEF) && (b->t == V_STR || b->t == V_UNDEF) &&
            !(a->t == V_UNDEF && b->t == V_UNDEF))
            return concat_str(c, a, b);
        if (a->t == V_LIST && b->t == V_LIST) {
            vlist *l = list_new(c, a->u.l->n + b->u.l->n);
            for (size_t i = 0; i < a->u.l->n; i++)
                list_push(c, l, a->u.l->v[i]);
            for (size_t i = 0; i < b->u.l->n; i++)
                list_push(c, l, b->u.l->v[i]);
            l->tuple = a->u.l->tuple;
            return v_list(l);
        }
    }
    if (op == OP_MUL) {
        if ((a->t == V_STR || a->t == V_LIST) && (b->t == V_INT || b->t == V_BOOL))
            return repeat(c, a, num_i(b), at);
        if ((b->t == V_STR || b->t == V_LIST) && (a->t == V_INT || a->t == V_BOOL))
            return repeat(c, b, num_i(a), at);
    }
    if (!is_number(a) || !is_number(b)) {
        static const char *sym[] = {"+", "-", "*", "/", "//", "%", "**", "~"};
        if (op == OP_MOD && a->t == V_STR)
            fail_at(c, LOOM_EUNSUPPORTED, at->line, at->col,
                    "unsupported operator '%%' for string formatting");
        rt_error(c, at, "unsupported operand types for %s: %s and %s", sym[op], type_name(a),
                 type_name(b));
    }
    bool ints = a->t != V_FLOAT && b->t != V_FLOAT;
    if (ints) {
        int64_t x = num_i(a), y = num_i(b), r;
        switch (op) {
        case OP_ADD:
            if (!__builtin_add_overflow(x, y, &r))
                return v_int(r);
            break;
        case OP_SUB:
            if (!__builtin_sub_overflow(x, y, &r))
                return v_int(r);
            break;
        case OP_MUL:
            if (!__builtin_mul_overflow(x, y, &r))
                return v_int(r);
            break;
        case OP_FLOORDIV:
        case OP_MOD: {
            if (y == 0)
                rt_error(c, at, "integer division or modulo by zero");
            if (x == INT64_MIN && y == -1)
                break;
            int64_t q = x / y, m = x % y;
            if (m != 0 && ((m < 0) != (y < 0))) { /* Python floors */
                q--;
                m += y;
            }
            return v_int(op == OP_FLOORDIV ? q : m);
        }
        case OP_POW:
            if (y >= 0) {
                int64_t acc = 1;
                bool ok = true;
                for (int64_t i = 0; i < y && ok; i++) {
                    ok = !__builtin_mul_overflow(acc, x, &acc);
                    if (acc == 0 || acc == 1)
                        break;
                    if (i > 64)
                        break;
                }
                if (ok && (y < 64 || x == 0 || x == 1 || x == -1))
                    return v_int(acc);
            }
            break;
        default:
            break;
        }
    }
    double x = num_f(a), y = num_f(b);
    switch (op) {
    case OP_ADD:
        return v_float(x + y);
    case OP_SUB:
        return v_float(x - y);
    case OP_MUL:
        return v_float(x * y);
    case OP_DIV:
        if (y == 0)
            rt_error(c, at, "division by zero");
        return v_float(x / y);
    case OP_FLOORDIV:
        if (y == 0)
            rt_error(c, at, "division by zero");
        return v_float(floor(x / y));
    case OP_MOD: {
        if (y == 0)
            rt_error(c, at, "modulo by zero");
        double m = fmod(x, y);
        if (m != 0 && ((m < 0) != (y < 0)))
            m += y;
        return v_float(m);
    }
    default:
        return v_float(pow(x, y));
    }
}

/* Python-style index normalisation; false when out of range. */
static bool norm_index(int64_t i, size_t n, size_t *out)
{
    if (i < 0)
        i += (int64_t)n;
    if (i < 0 || (uint64_t)i >= n)
        return false;
    *out = (size_t)i;
    return true;
}

static value get_item(jctx *c, const value *obj, const value *key, const node *at)
{
    switch (obj->t) {
    case V_DICT: {
        value *v = dict_find(c, obj->u.d, key);
        return v ? *v : v_undef();
    }
    case V_LIST: {
        size_t i;
        if (key->t != V_INT && key->t != V_BOOL)
            return v_undef();
        return norm_index(num_i(key), obj->u.l->n, &i) ? obj->u.l->v[i] : v_undef();
    }
    case V_STR: {
        size_t i;
        if (key->t != V_INT)
            return v_undef();
        size_t len = utf8_count(c, obj->u.s.s, obj->u.s.n);
        if (!norm_index(key->u.i, len, &i))
            return v_undef();
        size_t a = utf8_offset(c, obj->u.s.s, obj->u.s.n, i);
        size_t b = utf8_offset(c, obj->u.s.s, obj->u.s.n, i + 1);
        return v_str(obj->u.s.s + a, b - a);
    }
    default:
        (void)at;
        return v_undef();
    }
}

static int64_t slice_bound(const value *v, int64_t n, int64_t def, bool neg_step)
{
    if (v->t == V_NONE || v->t == V_UNDEF)
        return def;
    int64_t i = num_i(v);
    if (i < 0)
        i += n;
    int64_t lo = neg_step ? -1 : 0, hi = neg_step ? n - 1 : n;
    return i < lo ? lo : i > hi ? hi : i;
}

static value eval_slice(jctx *c, scope *s, const node *n)
{
    value obj = eval(c, s, n->a);
    value lo = n->b ? eval(c, s, n->b) : v_none();
    value hi = n->c ? eval(c, s, n->c) : v_none();
    value st = n->d ? eval(c, s, n->d) : v_none();
    const value *bounds[3] = {&lo, &hi, &st};
    for (int k = 0; k < 3; k++)
        if (bounds[k]->t != V_NONE && bounds[k]->t != V_UNDEF && bounds[k]->t != V_INT &&
            bounds[k]->t != V_BOOL)
            rt_error(c, n, "slice indices must be integers, not %s", type_name(bounds[k]));
    int64_t step = st.t == V_INT || st.t == V_BOOL ? num_i(&st) : 1;
    if (step == 0)
        rt_error(c, n, "slice step cannot be zero");
    if (obj.t != V_STR && obj.t != V_LIST)
        return v_undef(); /* as Jinja: subscripting what has no items is undefined */
    int64_t len =
        obj.t == V_STR ? (int64_t)utf8_count(c, obj.u.s.s, obj.u.s.n) : (int64_t)obj.u.l->n;
    bool neg = step < 0;
    if (step > len)
        step = len + 1; /* same items, and i += step cannot overflow */
    else if (step < -len)
        step = -len - 1;
    int64_t start = slice_bound(&lo, len, neg ? len - 1 : 0, neg);
    int64_t stop = slice_bound(&hi, len, neg ? -1 : len, neg);
    if (obj.t == V_LIST) {
        vlist *l = list_new(c, 0);
        for (int64_t i = start; neg ? i > stop : i < stop; i += step)
            list_push(c, l, obj.u.l->v[i]);
        l->tuple = obj.u.l->tuple;
        return v_list(l);
    }
    if (step == 1) {
        if (stop <= start)
            return v_cstr("");
        size_t a = utf8_offset(c, obj.u.s.s, obj.u.s.n, (size_t)start);
        size_t b = utf8_offset(c, obj.u.s.s, obj.u.s.n, (size_t)stop);
        return v_str(obj.u.s.s + a, b - a);
    }
    /* byte offset of every code point, then pick */
    size_t *at = arena_alloc(c, ((size_t)len + 1) * sizeof(size_t));
    size_t k = 0;
    for (size_t i = 0; i < obj.u.s.n; i++)
        if (((unsigned char)obj.u.s.s[i] & 0xC0) != 0x80)
            at[k++] = i;
    at[k] = obj.u.s.n;
    sbuf b = {0};
    for (int64_t i = start; neg ? i > stop : i < stop; i += step)
        sb_put(c, &b, obj.u.s.s + at[i], at[i + 1] - at[i]);
    return v_str(b.d ? b.d : "", b.n);
}

/* Evaluated arguments of a call, filter or test. */
typedef struct args {
    value *pos;
    int n_pos;
    const char **kw_names;
    value *kw;
    int n_kw;
} args;

static args eval_args(jctx *c, scope *s, const node *n)
{
    args a = {.n_pos = n->n_items, .n_kw = n->n_kw, .kw_names = n->kw_names};
    a.pos = arena_alloc(c, (size_t)(n->n_items + 1) * sizeof(value));
    a.kw = arena_alloc(c, (size_t)(n->n_kw + 1) * sizeof(value));
    for (int i = 0; i < n->n_items; i++)
        a.pos[i] = eval(c, s, n->items[i]);
    for (int i = 0; i < n->n_kw; i++)
        a.kw[i] = eval(c, s, n->kw_vals[i]);
    return a;
}

/* Argument i, or keyword `name`, or NULL. */
static const value *arg(const args *a, int i, const char *name)
{
    if (i >= 0 && i < a->n_pos)
        return &a->pos[i];
    for (int k = 0; name && k < a->n_kw; k++)
        if (strcmp(a->kw_names[k], name) == 0)
            return &a->kw[k];
    return NULL;
}

static const value *arg_str(jctx *c, const args *a, int i, const char *name, const node *at,
                            const char *what)
{
    const value *v = arg(a, i, name);
    if (v && v->t != V_STR)
        rt_error(c, at, "%s: argument %d must be a string, not %s", what, i + 1, type_name(v));
    return v;
}

static bool is_strip_char(char ch, const value *chars)
{
    if (!chars || chars->t == V_NONE || chars->t == V_UNDEF)
        return is_ws(ch) || (ch >= 0x1C && ch <= 0x1F);
    return memchr(chars->u.s.s, ch, chars->u.s.n) != NULL;
}

static value strip(const value *v, const value *chars, bool left, bool right)
{
    const char *s = v->u.s.s;
    size_t a = 0, b = v->u.s.n;
    if (left)
        while (a < b && is_strip_char(s[a], chars))
            a++;
    if (right)
        while (b > a && is_strip_char(s[b - 1], chars))
            b--;
    return v_str(s + a, b - a);
}

static value map_case(jctx *c, const value *v, int mode) /* 0 lower 1 upper 2 capitalize 3 title */
{
    char *p = arena_strndup(c, v->u.s.s, v->u.s.n);
    bool word_start = true;
    for (size_t i = 0; i < v->u.s.n; i++) {
        char ch = p[i];
        bool alpha = (ch | 0x20) >= 'a' && (ch | 0x20) <= 'z';
        bool up = mode == 1 || (mode == 2 && i == 0) || (mode == 3 && word_start);
        if (alpha)
            p[i] = up ? (char)(ch & ~0x20) : (char)(ch | 0x20);
        word_start = !alpha && !((unsigned char)ch >= 0x80) && !is_digit(ch);
    }
    return v_str(p, v->u.s.n);
}

static value replace_str(jctx *c, const value *v, const value *old, const value *new_,
                         int64_t count)
{
    charge(c, v->u.s.n);
    if (old->u.s.n == 0 && v->u.s.n == 0)
        return count == 0 ? *v : *new_;
    sbuf b = {0};
    const char *s = v->u.s.s, *end = s + v->u.s.n;
    int64_t done = 0;
    if (old->u.s.n == 0) { /* Python inserts between every character */
        while (s <= end) {
            if (count < 0 || done < count) {
                sb_put(c, &b, new_->u.s.s, new_->u.s.n);
                done++;
            }
            if (s == end)
                break;
            size_t k = 1;
            while (s + k < end && ((unsigned char)s[k] & 0xC0) == 0x80)
                k++;
            sb_put(c, &b, s, k);
            s += k;
        }
        return v_str(b.d ? b.d : "", b.n);
    }
    while (s < end) {
        const char *hit = (count < 0 || done < count)
                              ? memmem(s, (size_t)(end - s), old->u.s.s, old->u.s.n)
                              : NULL;
        if (!hit) {
            sb_put(c, &b, s, (size_t)(end - s));
            break;
        }
        sb_put(c, &b, s, (size_t)(hit - s));
        sb_put(c, &b, new_->u.s.s, new_->u.s.n);
        s = hit + old->u.s.n;
        done++;
    }
    return v_str(b.d ? b.d : "", b.n);
}

static value split_str(jctx *c, const value *v, const value *sep, int64_t maxsplit)
{
    charge(c, v->u.s.n);
    vlist *l = list_new(c, 0);
    const char *s = v->u.s.s, *end = s + v->u.s.n;
    if (!sep || sep->t == V_NONE) { /* runs of whitespace, no empty strings */
        int64_t done = 0;
        while (s < end) {
            while (s < end && is_ws(*s))
                s++;
            if (s >= end)
                break;
            if (maxsplit >= 0 && done >= maxsplit) {
                const char *e = end;
                while (e > s && is_ws(e[-1]))
                    e--;
                list_push(c, l, v_str(s, (size_t)(e - s)));
                break;
            }
            const char *w = s;
            while (s < end && !is_ws(*s))
                s++;
            list_push(c, l, v_str(w, (size_t)(s - w)));
            done++;
        }
        return v_list(l);
    }
    int64_t done = 0;
    for (;;) {
        const char *hit = (maxsplit < 0 || done < maxsplit)
                              ? memmem(s, (size_t)(end - s), sep->u.s.s, sep->u.s.n)
                              : NULL;
        if (!hit) {
            list_push(c, l, v_str(s, (size_t)(end - s)));
            break;
        }
        list_push(c, l, v_str(s, (size_t)(hit - s)));
        s = hit + sep->u.s.n;
        done++;
    }
    return v_list(l);
}

static vlist *iterate(jctx *c, const value *v, const node *at)
{
    switch (v->t) {
    case V_LIST:
        return v->u.l;
    case V_DICT: {
        vlist *l = list_new(c, v->u.d->n);
        for (size_t i = 0; i < v->u.d->n; i++)
            list_push(c, l, v->u.d->keys[i]);
        return l;
    }
    case V_STR: {
        vlist *l = list_new(c, 0);
        const char *s = v->u.s.s, *end = s + v->u.s.n;
        while (s < end) {
            size_t k = 1;
            while (s + k < end && ((unsigned char)s[k] & 0xC0) == 0x80)
                k++;
            list_push(c, l, v_str(s, k));
            s += k;
        }
        return l;
    }
    case V_UNDEF:
        return list_new(c, 0);
    default:
        rt_error(c, at, "a %s is not iterable", type_name(v));
    }
}

static value attr_of(jctx *c, const value *obj, const char *name)
{
    if (obj->t == V_DICT) {
        value *v = dict_find_str(c, obj->u.d, name, strlen(name));
        return v ? *v : v_undef();
    }
    (void)c;
    return v_undef();
}

static value apply_filter(jctx *c, const char *name, value v, const args *a, const node *at,
                          scope *s);
static bool apply_test(jctx *c, const char *name, const value *v, const args *a, const node *at);

static value items_of(jctx *c, const value *v, const node *at)
{
    if (v->t == V_UNDEF)
        return v_list(list_new(c, 0));
    if (v->t != V_DICT)
        rt_error(c, at, "items: a %s is not a mapping", type_name(v));
    vlist *l = list_new(c, v->u.d->n);
    for (size_t i = 0; i < v->u.d->n; i++) {
        vlist *pair = list_new(c, 2);
        pair->tuple = true;
        list_push(c, pair, v->u.d->keys[i]);
        list_push(c, pair, v->u.d->vals[i]);
        list_push(c, l, v_list(pair));
    }
    return v_list(l);
}

static value json_filter(jctx *c, const value *v, const args *a, const node *at)
{
    json_opts o = {.indent = -1, .item_sep = ", ", .key_sep = ": "};
    /* transformers' signature: tojson(x, ensure_ascii, indent, separators, sort_keys) */
    const value *ascii = arg(a, 0, "ensure_ascii"), *indent = arg(a, 1, "indent");
    const value *seps = arg(a, 2, "separators"), *sort = arg(a, 3, "sort_keys");
    if (indent && indent->t == V_INT) {
        o.indent = indent->u.i < 0 ? 0 : indent->u.i > 64 ? 64 : (int)indent->u.i;
        o.item_sep = ",";
    }
    if (seps && seps->t == V_LIST && seps->u.l->n == 2 && seps->u.l->v[0].t == V_STR &&
        seps->u.l->v[1].t == V_STR) {
        o.item_sep = arena_strndup(c, seps->u.l->v[0].u.s.s, seps->u.l->v[0].u.s.n);
        o.key_sep = arena_strndup(c, seps->u.l->v[1].u.s.s, seps->u.l->v[1].u.s.n);
    }
    o.sort_keys = sort && truthy(sort);
    o.ensure_ascii = ascii && truthy(ascii);
    sbuf b = {0};
    to_json(c, &b, v, &o, 0, at);
    return v_str(b.d ? b.d : "", b.n);
}

/* selectattr / rejectattr / select / reject */
static value select_items(jctx *c, const value *v, const args *a, bool by_attr, bool keep,
                          const node *at)
{
    vlist *src = iterate(c, v, at), *out = list_new(c, 0);
    int first = by_attr ? 1 : 0;
    const value *attr = by_attr ? arg(a, 0, NULL) : NULL;
    if (by_attr && (!attr || attr->t != V_STR))
        rt_error(c, at, "selectattr/rejectattr need an attribute name");
    const value *test = arg(a, first, NULL);
    if (test && test->t != V_STR)
        rt_error(c, at, "select: the test name must be a string");
    args rest = {.pos = a->pos + (a->n_pos > first + 1 ? first + 1 : a->n_pos),
                 .n_pos = a->n_pos > first + 1 ? a->n_pos - first - 1 : 0};
    char *tname = test ? arena_strndup(c, test->u.s.s, test->u.s.n) : NULL;
    char *aname = attr ? arena_strndup(c, attr->u.s.s, attr->u.s.n) : NULL;
    for (size_t i = 0; i < src->n; i++) {
        value x = aname ? attr_of(c, &src->v[i], aname) : src->v[i];
        bool ok = tname ? apply_test(c, tname, &x, &rest, at) : truthy(&x);
        if (ok == keep)
            list_push(c, out, src->v[i]);
    }
    return v_list(out);
}

static value apply_filter(jctx *c, const char *name, value v, const args *a, const node *at,
                          scope *s)
{
    (void)s;
#define IS(x) (strcmp(name, x) == 0)
    if (IS("safe") || IS("e") || IS("escape") || IS("forceescape")) {
        if (!IS("safe"))
            unsupported(c, at, "filter", name); /* autoescape is off in transformers */
        return v;
    }
    if (IS("trim")) {
        value sv = to_str(c, &v);
        const value *chars = arg_str(c, a, 0, "chars", at, "trim");
        return strip(&sv, chars, true, true);
    }
    if (IS("length") || IS("count")) {
        switch (v.t) {
        case V_STR:
            return v_int((int64_t)utf8_count(c, v.u.s.s, v.u.s.n));
        case V_LIST:
            return v_int((int64_t)v.u.l->n);
        case V_DICT:
            return v_int((int64_t)v.u.d->n);
        case V_UNDEF:
            return v_int(0);
        default:
            rt_error(c, at, "length: a %s has no length", type_name(&v));
        }
    }
    if (IS("upper") || IS("lower") || IS("capitalize") || IS("title")) {
        value sv = to_str(c, &v);
        return map_case(c, &sv, IS("lower") ? 0 : IS("upper") ? 1 : IS("capitalize") ? 2 : 3);
    }
    if (IS("string"))
        return to_str(c, &v);
    if (IS("tojson"))
        return json_filter(c, &v, a, at);
    if (IS("default") || IS("d")) {
        const value *def = arg(a, 0, "default_value");
        const value *boolean = arg(a, 1, "boolean");
        bool use = v.t == V_UNDEF || (boolean && truthy(boolean) && !truthy(&v));
        return use ? (def ? *def : v_cstr("")) : v;
    }
    if (IS("join")) {
        const value *sep = arg_str(c, a, 0, "d", at, "join");
        const value *attr = arg(a, 1, "attribute");
        vlist *l = iterate(c, &v, at);
        sbuf b = {0};
        char *aname = attr && attr->t == V_STR ? arena_strndup(c, attr->u.s.s, attr->u.s.n) : NULL;
        for (size_t i = 0; i < l->n; i++) {
            if (i && sep)
                sb_put(c, &b, sep->u.s.s, sep->u.s.n);
            value x = aname ? attr_of(c, &l->v[i], aname) : l->v[i];
            format_value(c, &b, &x, false);
        }
        return v_str(b.d ? b.d : "", b.n);
    }
    if (IS("first") || IS("last")) {
        vlist *l = iterate(c, &v, at);
        if (!l->n)
            return v_undef();
        return IS("first") ? l->v[0] : l->v[l->n - 1];
    }
    if (IS("list")) {
        vlist *l = iterate(c, &v, at), *out = list_new(c, l->n);
        for (size_t i = 0; i < l->n; i++)
            list_push(c, out, l->v[i]);
        return v_list(out);
    }
    if (IS("reverse")) {
        if (v.t == V_STR) {
            vlist *chars = iterate(c, &v, at);
            sbuf b = {0};
            for (size_t i = chars->n; i-- > 0;)
                sb_put(c, &b, chars->v[i].u.s.s, chars->v[i].u.s.n);
            return v_str(b.d ? b.d : "", b.n);
        }
        vlist *l = iterate(c, &v, at), *r = list_new(c, l->n);
        for (size_t i = l->n; i-- > 0;)
            list_push(c, r, l->v[i]);
        return v_list(r);
    }
    if (IS("replace")) {
        value sv = to_str(c, &v);
        const value *old = arg_str(c, a, 0, "old", at, "replace");
        const value *new_ = arg_str(c, a, 1, "new", at, "replace");
        const value *count = arg(a, 2, "count");
        if (!old || !new_)
            rt_error(c, at, "replace needs two arguments");
        return replace_str(c, &sv, old, new_, count && count->t == V_INT ? count->u.i : -1);
    }
    if (IS("items"))
        return items_of(c, &v, at);
    if (IS("int")) {
        if (v.t == V_STR) {
            char *str = arena_strndup(c, v.u.s.s, v.u.s.n), *end;
            long long x = strtoll(str, &end, 10);
            return v_int(end != str ? x : 0);
        }
        return is_number(&v) ? v_int(num_i(&v)) : v_int(0);
    }
    if (IS("float")) {
        if (v.t == V_STR) {
            char *str = arena_strndup(c, v.u.s.s, v.u.s.n);
            return v_float(strtod(str, NULL));
        }
        return is_number(&v) ? v_float(num_f(&v)) : v_float(0);
    }
    if (IS("abs")) {
        if (v.t == V_INT || v.t == V_BOOL)
            return v_int(num_i(&v) < 0 && num_i(&v) != INT64_MIN ? -num_i(&v) : num_i(&v));
        if (is_number(&v))
            return v_float(fabs(num_f(&v)));
        rt_error(c, at, "abs: a %s is not a number", type_name(&v));
    }
    if (IS("indent")) {
        value sv = to_str(c, &v);
        const value *w = arg(a, 0, "width"), *first = arg(a, 1, "first");
        const value *blank = arg(a, 2, "blank");
        sbuf pad = {0};
        if (w && w->t == V_STR)
            sb_put(c, &pad, w->u.s.s, w->u.s.n);
        else
            for (int64_t i = 0; i < (w && is_number(w) ? (num_i(w) > 256 ? 256 : num_i(w)) : 4);
                 i++)
                sb_put(c, &pad, " ", 1);
        sbuf b = {0};
        const char *p = sv.u.s.s, *end = p + sv.u.s.n;
        bool first_line = true;
        while (p <= end) {
            const char *nl = memchr(p, '\n', (size_t)(end - p));
            const char *le = nl ? nl : end;
            bool empty = le == p;
            if ((!first_line || (first && truthy(first))) && (!empty || (blank && truthy(blank))))
                sb_put(c, &b, pad.d, pad.n);
            sb_put(c, &b, p, (size_t)(le - p));
            if (!nl)
                break;
            sb_put(c, &b, "\n", 1);
            p = nl + 1;
            first_line = false;
        }
        return v_str(b.d ? b.d : "", b.n);
    }
    if (IS("selectattr") || IS("rejectattr"))
        return select_items(c, &v, a, true, IS("selectattr"), at);
    if (IS("select") || IS("reject"))
        return select_items(c, &v, a, false, IS("select"), at);
    if (IS("map")) {
        vlist *l = iterate(c, &v, at), *out = list_new(c, l->n);
        const value *attr = arg(a, -1, "attribute"), *def = arg(a, -1, "default");
        const value *fname = arg(a, 0, NULL);
        if (attr && attr->t == V_STR) {
            char *aname = arena_strndup(c, attr->u.s.s, attr->u.s.n);
            for (size_t i = 0; i < l->n; i++) {
                value x = attr_of(c, &l->v[i], aname);
                list_push(c, out, x.t == V_UNDEF && def ? *def : x);
            }
            return v_list(out);
        }
        if (!fname || fname->t != V_STR)
            rt_error(c, at, "map needs a filter name or attribute=");
        char *f = arena_strndup(c, fname->u.s.s, fname->u.s.n);
        args rest = {.pos = a->pos + 1, .n_pos = a->n_pos - 1};
        for (size_t i = 0; i < l->n; i++)
            list_push(c, out, apply_filter(c, f, l->v[i], &rest, at, s));
        return v_list(out);
    }
    if (IS("unique")) {
        vlist *l = iterate(c, &v, at), *out = list_new(c, 0);
        const value *cs = arg(a, 0, "case_sensitive");
        bool fold = !(cs && truthy(cs));
        for (size_t i = 0; i < l->n; i++) {
            bool seen = false;
            for (size_t k = 0; k < out->n && !seen; k++) {
                step(c, at);
                seen = fold && out->v[k].t == V_STR && l->v[i].t == V_STR
                           ? cmp_fold(c, &out->v[k], &l->v[i], true, at) == 0
                           : values_equal(c, &out->v[k], &l->v[i]);
            }
            if (!seen)
                list_push(c, out, l->v[i]);
        }
        return v_list(out);
    }
    if (IS("sort")) {
        vlist *l = iterate(c, &v, at), *out = list_new(c, l->n);
        const value *rev = arg(a, 0, "reverse"), *attr = arg(a, 2, "attribute");
        const value *cs = arg(a, 1, "case_sensitive");
        bool fold = !(cs && truthy(cs));
        char *aname = attr && attr->t == V_STR ? arena_strndup(c, attr->u.s.s, attr->u.s.n) : NULL;
        for (size_t i = 0; i < l->n; i++)
            list_push(c, out, l->v[i]);
        for (size_t i = 1; i < out->n; i++) { /* stable insertion sort */
            for (size_t j = i; j > 0; j--) {
                value x = aname ? attr_of(c, &out->v[j - 1], aname) : out->v[j - 1];
                value y = aname ? attr_of(c, &out->v[j], aname) : out->v[j];
                int r = cmp_fold(c, &x, &y, fold, at);
                if (rev && truthy(rev) ? r >= 0 : r <= 0)
                    break;
                value tmp = out->v[j];
                out->v[j] = out->v[j - 1];
                out->v[j - 1] = tmp;
                step(c, at);
            }
        }
        return v_list(out);
    }
    if (IS("min") || IS("max")) {
        vlist *l = iterate(c, &v, at);
        if (!l->n)
            return v_undef();
        const value *cs = arg(a, 0, "case_sensitive");
        bool fold = !(cs && truthy(cs));
        value best = l->v[0];
        for (size_t i = 1; i < l->n; i++) {
            int r = cmp_fold(c, &l->v[i], &best, fold, at);
            if (IS("min") ? r < 0 : r > 0)
                best = l->v[i];
        }
        return best;
    }
    if (IS("sum")) {
        vlist *l = iterate(c, &v, at);
        value acc = v_int(0);
        for (size_t i = 0; i < l->n; i++)
            acc = arith(c, OP_ADD, &acc, &l->v[i], at);
        return acc;
    }
    if (IS("wordcount")) {
        value sv = to_str(c, &v);
        return v_int((int64_t)split_str(c, &sv, NULL, -1).u.l->n);
    }
    if (IS("dictsort")) {
        value it = items_of(c, &v, at);
        vlist *l = it.u.l;
        for (size_t i = 1; i < l->n; i++)
            for (size_t j = i;
                 j > 0 && cmp_values(c, &l->v[j - 1].u.l->v[0], &l->v[j].u.l->v[0], at) > 0; j--) {
                value tmp = l->v[j];
                l->v[j] = l->v[j - 1];
                l->v[j - 1] = tmp;
            }
        return it;
    }
#undef IS
    unsupported(c, at, "filter", name);
}

static bool apply_test(jctx *c, const char *name, const value *v, const args *a, const node *at)
{
#define IS(x) (strcmp(name, x) == 0)
    const value *x = arg(a, 0, NULL);
    if (IS("defined"))
        return v->t != V_UNDEF;
    if (IS("undefined"))
        return v->t == V_UNDEF;
    if (IS("none"))
        return v->t == V_NONE;
    if (IS("string"))
        return v->t == V_STR;
    if (IS("number"))
        return v->t == V_INT || v->t == V_FLOAT;
    if (IS("integer"))
        return v->t == V_INT;
    if (IS("float"))
        return v->t == V_FLOAT;
    if (IS("boolean"))
        return v->t == V_BOOL;
    if (IS("true"))
        return v->t == V_BOOL && v->u.b;
    if (IS("false"))
        return v->t == V_BOOL && !v->u.b;
    if (IS("mapping"))
        return v->t == V_DICT;
    if (IS("sequence"))
        return v->t == V_LIST || v->t == V_STR || v->t == V_DICT;
    if (IS("iterable"))
        return v->t == V_LIST || v->t == V_STR || v->t == V_DICT;
    if (IS("callable"))
        return v->t == V_MACRO || v->t == V_FUNC;
    if (IS("lower") || IS("upper")) {
        if (v->t != V_STR)
            return false;
        bool cased = false;
        for (size_t i = 0; i < v->u.s.n; i++) {
            char ch = v->u.s.s[i];
            if (ch >= 'a' && ch <= 'z') {
                if (IS("upper"))
                    return false;
                cased = true;
            } else if (ch >= 'A' && ch <= 'Z') {
                if (IS("lower"))
                    return false;
                cased = true;
            }
        }
        return cased;
    }
    if (IS("even") || IS("odd")) {
        if (!is_number(v))
            rt_error(c, at, "test '%s' needs a number", name);
        value two = v_int(2), m = arith(c, OP_MOD, v, &two, at);
        return IS("even") ? num_f(&m) == 0 : num_f(&m) == 1;
    }
    if (IS("divisibleby")) {
        if (!x || !is_number(x) || !is_number(v) || num_i(x) == 0)
            rt_error(c, at, "divisibleby needs a non-zero number");
        return num_i(x) == -1 || num_i(v) % num_i(x) == 0;
    }
    if (!x && (IS("eq") || IS("equalto") || IS("==") || IS("ne") || IS("!=") || IS("in") ||
               IS("lt") || IS("gt") || IS("le") || IS("ge") || IS("sameas")))
        rt_error(c, at, "test '%s' needs an argument", name);
    if (IS("eq") || IS("equalto") || IS("sameas"))
        return values_equal(c, v, x);
    if (IS("ne"))
        return !values_equal(c, v, x);
    if (IS("in"))
        return contains(c, v, x, at);
    if (IS("lt") || IS("lessthan"))
        return cmp_values(c, v, x, at) < 0;
    if (IS("gt") || IS("greaterthan"))
        return cmp_values(c, v, x, at) > 0;
    if (IS("le"))
        return cmp_values(c, v, x, at) <= 0;
    if (IS("ge"))
        return cmp_values(c, v, x, at) >= 0;
#undef IS
    unsupported(c, at, "test", name);
}

static value call_method(jctx *c, const value *obj, const char *name, const args *a, const node *at)
{
#define IS(x) (strcmp(name, x) == 0)
    if (obj->t == V_STR) {
        if (IS("strip") || IS("lstrip") || IS("rstrip")) {
            const value *chars = arg(a, 0, "chars");
            if (chars && chars->t != V_STR && chars->t != V_NONE)
                rt_error(c, at, "%s: chars must be a string", name);
            return strip(obj, chars, !IS("rstrip"), !IS("lstrip"));
        }
        if (IS("startswith") || IS("endswith")) {
            const value *p = arg(a, 0, NULL);
            if (!p)
                rt_error(c, at, "%s needs an argument", name);
            vlist one = {.v = (value *)p, .n = 1};
            const vlist *cands = p->t == V_LIST ? p->u.l : &one;
            for (size_t i = 0; i < cands->n; i++) {
                const value *q = &cands->v[i];
                if (q->t != V_STR)
                    rt_error(c, at, "%s: argument must be a string", name);
                if (q->u.s.n > obj->u.s.n)
                    continue;
                const char *from =
                    IS("startswith") ? obj->u.s.s : obj->u.s.s + obj->u.s.n - q->u.s.n;
                if (memcmp(from, q->u.s.s, q->u.s.n) == 0)
                    return v_bool(true);
            }
            return v_bool(false);
        }
        if (IS("split") || IS("rsplit")) {
            const value *sep = arg(a, 0, "sep"), *maxs = arg(a, 1, "maxsplit");
            if (sep && sep->t != V_STR && sep->t != V_NONE)
                rt_error(c, at, "split: the separator must be a string");
            if (sep && sep->t == V_STR && sep->u.s.n == 0)
                rt_error(c, at, "split: empty separator");
            int64_t m = maxs && maxs->t == V_INT ? maxs->u.i : -1;
            if (IS("rsplit") && m >= 0)
                unsupported(c, at, "method", "rsplit with maxsplit");
            return split_str(c, obj, sep && sep->t == V_STR ? sep : NULL, m);
        }
        if (IS("upper") || IS("lower") || IS("capitalize") || IS("title"))
            return map_case(c, obj, IS("lower") ? 0 : IS("upper") ? 1 : IS("capitalize") ? 2 : 3);
        if (IS("replace")) {
            const value *old = arg_str(c, a, 0, NULL, at, "replace");
            const value *new_ = arg_str(c, a, 1, NULL, at, "replace");
            const value *count = arg(a, 2, NULL);
            if (!old || !new_)
                rt_error(c, at, "replace needs two arguments");
            return replace_str(c, obj, old, new_, count && count->t == V_INT ? count->u.i : -1);
        }
        if (IS("find") || IS("count")) {
            const value *sub = arg_str(c, a, 0, NULL, at, name);
            charge(c, obj->u.s.n);
            if (!sub)
                rt_error(c, at, "%s needs an argument", name);
            if (IS("find")) {
                const char *hit = memmem(obj->u.s.s, obj->u.s.n, sub->u.s.s, sub->u.s.n);
                return v_int(hit ? (int64_t)utf8_count(c, obj->u.s.s, (size_t)(hit - obj->u.s.s))
                                 : -1);
            }
            if (sub->u.s.n == 0)
                return v_int((int64_t)utf8_count(c, obj->u.s.s, obj->u.s.n) + 1);
            int64_t k = 0;
            const char *p = obj->u.s.s, *end = p + obj->u.s.n;
            while ((p = memmem(p, (size_t)(end - p), sub->u.s.s, sub->u.s.n))) {
                k++;
                p += sub->u.s.n;
            }
            return v_int(k);
        }
        if (IS("join")) {
            const value *seq = arg(a, 0, NULL);
            if (!seq)
                rt_error(c, at, "join needs an argument");
            vlist *l = iterate(c, seq, at);
            sbuf b = {0};
            for (size_t i = 0; i < l->n; i++) {
                if (i)
                    sb_put(c, &b, obj->u.s.s, obj->u.s.n);
                format_value(c, &b, &l->v[i], false);
            }
            return v_str(b.d ? b.d : "", b.n);
        }
        if (IS("isdigit") || IS("isspace") || IS("isalpha")) {
            if (!obj->u.s.n)
                return v_bool(false);
            for (size_t i = 0; i < obj->u.s.n; i++) {
                char ch = obj->u.s.s[i];
                bool ok = IS("isdigit")   ? is_digit(ch)
                          : IS("isspace") ? is_ws(ch)
                                          : ((ch | 0x20) >= 'a' && (ch | 0x20) <= 'z');
                if (!ok)
                    return v_bool(false);
            }
            return v_bool(true);
        }
    }
    if (obj->t == V_DICT) {
        if (IS("get")) {
            const value *k = arg(a, 0, NULL), *def = arg(a, 1, NULL);
            if (!k)
                rt_error(c, at, "get needs a key");
            value *v = dict_find(c, obj->u.d, k);
            return v ? *v : def ? *def : v_none();
        }
        if (IS("items"))
            return items_of(c, obj, at);
        if (IS("keys") || IS("values")) {
            vlist *l = list_new(c, obj->u.d->n);
            for (size_t i = 0; i < obj->u.d->n; i++)
                list_push(c, l, IS("keys") ? obj->u.d->keys[i] : obj->u.d->vals[i]);
            return v_list(l);
        }
    }
#undef IS
    char what[80];
    snprintf(what, sizeof(what), "%s.%s()", type_name(obj), name);
    unsupported(c, at, "method", what);
}

static value render_macro(jctx *c, const macro *m, const args *a, const node *at);

static value call_function(jctx *c, int fn, const args *a, const node *at)
{
    switch (fn) {
    case F_RAISE: {
        const value *msg = arg(a, 0, NULL);
        value s = msg ? to_str(c, msg) : v_cstr("raise_exception() called");
        loom_errf(c->e, LOOM_EINVAL, "%.*s", (int)(s.u.s.n > 500 ? 500 : s.u.s.n), s.u.s.s);
        c->code = LOOM_EINVAL;
        longjmp(c->jmp, 1);
    }
    case F_NAMESPACE:
    case F_DICT: {
        vdict *d = dict_new(c);
        d->ns = fn == F_NAMESPACE;
        if (a->n_pos > 0 && a->pos[0].t == V_DICT) /* namespace(existing_dict) */
            for (size_t i = 0; i < a->pos[0].u.d->n; i++)
                dict_set(c, d, a->pos[0].u.d->keys[i], a->pos[0].u.d->vals[i]);
        for (int i = 0; i < a->n_kw; i++)
            dict_set_str(c, d, a->kw_names[i], a->kw[i]);
        return v_dict(d);
    }
    case F_RANGE: {
        int64_t lo = 0, hi, st = 1;
        for (int i = 0; i < a->n_pos; i++)
            if (a->pos[i].t != V_INT)
                rt_error(c, at, "range() needs integers");
        if (a->n_pos == 1) {
            hi = a->pos[0].u.i;
        } else if (a->n_pos == 2 || a->n_pos == 3) {
            lo = a->pos[0].u.i;
            hi = a->pos[1].u.i;
            if (a->n_pos == 3)
                st = a->pos[2].u.i;
        } else {
            rt_error(c, at, "range() takes 1 to 3 arguments");
        }
        if (st == 0)
            rt_error(c, at, "range() step must not be zero");
        vlist *l = list_new(c, 0);
        for (int64_t i = lo; st > 0 ? i < hi : i > hi; i += st) {
            if (l->n >= (1u << 20))
                rt_error(c, at, "range() longer than %u items", 1u << 20);
            list_push(c, l, v_int(i));
            if ((st > 0 && i > INT64_MAX - st) || (st < 0 && i < INT64_MIN - st))
                break;
        }
        return v_list(l);
    }
    case F_STRFTIME: {
        const value *fmt = arg(a, 0, NULL);
        if (!fmt || fmt->t != V_STR)
            rt_error(c, at, "strftime_now needs a format string");
        time_t now = time(NULL);
        struct tm tm;
        localtime_r(&now, &tm);
        char *f = arena_strndup(c, fmt->u.s.s, fmt->u.s.n > 200 ? 200 : fmt->u.s.n);
        char buf[512];
        size_t n = strftime(buf, sizeof(buf), f, &tm);
        return v_str(arena_strndup(c, buf, n), n);
    }
    }
    rt_error(c, at, "unknown function");
}

static value eval_call(jctx *c, scope *s, const node *n)
{
    const node *callee = n->a;
    if (callee->kind == E_ATTR) { /* obj.method(...) */
        value obj = eval(c, s, callee->a);
        value member = attr_of(c, &obj, callee->name);
        args a = eval_args(c, s, n);
        if (member.t == V_MACRO)
            return render_macro(c, member.u.m, &a, n);
        if (obj.t == V_UNDEF)
            rt_error(c, n, "cannot call '%s' on an undefined value", callee->name);
        return call_method(c, &obj, callee->name, &a, n);
    }
    value f = eval(c, s, callee);
    args a = eval_args(c, s, n);
    if (f.t == V_FUNC)
        return call_function(c, f.u.fn, &a, n);
    if (f.t == V_MACRO)
        return render_macro(c, f.u.m, &a, n);
    if (callee->kind == E_NAME && f.t == V_UNDEF)
        unsupported(c, n, "function", callee->name);
    rt_error(c, n, "a %s is not callable", type_name(&f));
}

static value eval(jctx *c, scope *s, const node *n)
{
    step(c, n);
    enter(c, &(token){.line = n->line, .col = n->col});
    value r;
    switch (n->kind) {
    case E_LIT:
        r = n->lit;
        break;
    case E_NAME:
        r = lookup(c, s, n->name);
        break;
    case E_ATTR: {
        value obj = eval(c, s, n->a);
        r = attr_of(c, &obj, n->name);
        break;
    }
    case E_ITEM: {
        value obj = eval(c, s, n->a), key = eval(c, s, n->b);
        r = get_item(c, &obj, &key, n);
        break;
    }
    case E_SLICE:
        r = eval_slice(c, s, n);
        break;
    case E_CALL:
        r = eval_call(c, s, n);
        break;
    case E_FILTER: {
        value v = eval(c, s, n->a);
        args a = eval_args(c, s, n);
        r = apply_filter(c, n->name, v, &a, n, s);
        break;
    }
    case E_TEST: {
        value v = eval(c, s, n->a);
        args a = eval_args(c, s, n);
        bool t = apply_test(c, n->name, &v, &a, n);
        r = v_bool(n->op ? !t : t);
        break;
    }
    case E_NOT: {
        value v = eval(c, s, n->a);
        r = v_bool(!truthy(&v));
        break;
    }
    case E_NEG:
    case E_POS: {
        value v = eval(c, s, n->a);
        if (!is_number(&v))
            rt_error(c, n, "bad operand type for unary %s: %s", n->kind == E_NEG ? "-" : "+",
                     type_name(&v));
        if (n->kind == E_POS)
            r = v.t == V_BOOL ? v_int(v.u.b) : v;
        else if (v.t == V_FLOAT)
            r = v_float(-v.u.f);
        else if (num_i(&v) == INT64_MIN)
            r = v_float(-(double)INT64_MIN);
        else
            r = v_int(-num_i(&v));
        break;
    }
    case E_BIN: {
        value a = eval(c, s, n->a), b = eval(c, s, n->b);
        r = arith(c, n->op, &a, &b, n);
        break;
    }
    case E_CMP: {
        value left = eval(c, s, n->items[0]);
        r = v_bool(true);
        for (int i = 1; i < n->n_items; i++) {
            value right = eval(c, s, n->items[i]);
            bool ok;
            switch (n->ops[i - 1]) {
            case CMP_EQ:
                ok = values_equal(c, &left, &right);
                break;
            case CMP_NE:
                ok = !values_equal(c, &left, &right);
                break;
            case CMP_LT:
                ok = cmp_values(c, &left, &right, n) < 0;
                break;
            case CMP_GT:
                ok = cmp_values(c, &left, &right, n) > 0;
                break;
            case CMP_LE:
                ok = cmp_values(c, &left, &right, n) <= 0;
                break;
            case CMP_GE:
                ok = cmp_values(c, &left, &right, n) >= 0;
                break;
            case CMP_IN:
                ok = contains(c, &left, &right, n);
                break;
            default:
                ok = !contains(c, &left, &right, n);
                break;
            }
            if (!ok) {
                r = v_bool(false);
                break;
            }
            left = right;
        }
        break;
    }
    case E_AND: {
        value a = eval(c, s, n->a);
        r = truthy(&a) ? eval(c, s, n->b) : a;
        break;
    }
    case E_OR: {
        value a = eval(c, s, n->a);
        r = truthy(&a) ? a : eval(c, s, n->b);
        break;
    }
    case E_COND: {
        value cond = eval(c, s, n->b);
        r = truthy(&cond) ? eval(c, s, n->a) : n->c ? eval(c, s, n->c) : v_undef();
        break;
    }
    case E_LIST:
    case E_TUPLE: {
        vlist *l = list_new(c, (size_t)n->n_items);
        l->tuple = n->kind == E_TUPLE;
        for (int i = 0; i < n->n_items; i++)
            list_push(c, l, eval(c, s, n->items[i]));
        r = v_list(l);
        break;
    }
    case E_DICT: {
        vdict *d = dict_new(c);
        for (int i = 0; i + 1 < n->n_items; i += 2) {
            value k = eval(c, s, n->items[i]), v = eval(c, s, n->items[i + 1]);
            dict_set(c, d, k, v);
        }
        r = v_dict(d);
        break;
    }
    default:
        rt_error(c, n, "internal error: not an expression");
    }
    c->depth--;
    return r;
}

/* ---------------------------------------------------------------- statements */

enum flow { FLOW_NORMAL, FLOW_BREAK, FLOW_CONTINUE };

static int exec_node(jctx *c, scope *s, const node *n, sbuf *out);

static int exec_body(jctx *c, scope *s, const node *body, sbuf *out)
{
    if (!body)
        return FLOW_NORMAL;
    for (int i = 0; i < body->n_items; i++) {
        int f = exec_node(c, s, body->items[i], out);
        if (f != FLOW_NORMAL)
            return f;
    }
    return FLOW_NORMAL;
}

static void bind_targets(jctx *c, scope *s, const node *n, const value *v)
{
    if (n->n_targets == 1) {
        dict_set_str(c, &s->vars, n->targets[0], *v);
        return;
    }
    if (v->t != V_LIST || v->u.l->n != (size_t)n->n_targets)
        rt_error(c, n, "cannot unpack a %s into %d names", type_name(v), n->n_targets);
    for (int i = 0; i < n->n_targets; i++)
        dict_set_str(c, &s->vars, n->targets[i], v->u.l->v[i]);
}

static int exec_for(jctx *c, scope *s, const node *n, sbuf *out)
{
    value it = eval(c, s, n->a);
    vlist *src = iterate(c, &it, n);
    vlist *items = src;
    if (n->b) { /* `for x in xs if cond`: loop.* counts the kept items */
        items = list_new(c, 0);
        for (size_t i = 0; i < src->n; i++) {
            scope *fs = scope_new(c, s);
            bind_targets(c, fs, n, &src->v[i]);
            value ok = eval(c, fs, n->b);
            if (truthy(&ok))
                list_push(c, items, src->v[i]);
        }
    }
    size_t len = items->n;
    /* One `loop` object advanced in place, as Jinja's LoopContext; each iteration gets an empty
     * scope, recycled unless a macro defined in it captured it. */
    static const char *const keys[] = {"index",  "index0",   "revindex", "revindex0",
                                       "first",  "last",     "length",   "depth",
                                       "depth0", "previtem", "nextitem"};
    enum { N_LOOP_KEYS = 11 };
    vdict *loop = dict_new_cap(c, N_LOOP_KEYS);
    for (int k = 0; k < N_LOOP_KEYS; k++)
        dict_set_str(c, loop, keys[k], v_undef());
    scope *body = NULL;
    for (size_t i = 0; i < len; i++) {
        step(c, n);
        if (!body || body->captured)
            body = scope_new(c, s);
        body->vars.n = 0;
        value *lv = loop->vals;
        lv[0] = v_int((int64_t)i + 1);
        lv[1] = v_int((int64_t)i);
        lv[2] = v_int((int64_t)(len - i));
        lv[3] = v_int((int64_t)(len - i - 1));
        lv[4] = v_bool(i == 0);
        lv[5] = v_bool(i + 1 == len);
        lv[6] = v_int((int64_t)len);
        lv[7] = v_int(1);
        lv[8] = v_int(0);
        lv[9] = i > 0 ? items->v[i - 1] : v_undef();
        lv[10] = i + 1 < len ? items->v[i + 1] : v_undef();
        dict_set_str(c, &body->vars, "loop", v_dict(loop));
        bind_targets(c, body, n, &items->v[i]);
        int f = exec_body(c, body, n->c, out);
        if (f == FLOW_BREAK)
            break;
    }
    if (len == 0)
        return exec_body(c, s, n->d, out);
    return FLOW_NORMAL;
}

static value render_macro(jctx *c, const macro *m, const args *a, const node *at)
{
    const node *def = m->def;
    if (a->n_pos > def->n_kw)
        rt_error(c, at, "macro '%s' takes at most %d arguments", def->name, def->n_kw);
    scope *s = scope_new(c, m->closure);
    for (int i = 0; i < def->n_kw; i++) {
        const value *v = i < a->n_pos ? &a->pos[i] : NULL;
        for (int k = 0; !v && k < a->n_kw; k++)
            if (strcmp(a->kw_names[k], def->kw_names[i]) == 0)
                v = &a->kw[k];
        value val = v ? *v : def->kw_vals[i] ? eval(c, s, def->kw_vals[i]) : v_undef();
        dict_set_str(c, &s->vars, def->kw_names[i], val);
    }
    for (int k = 0; k < a->n_kw; k++) {
        bool known = false;
        for (int i = 0; i < def->n_kw; i++)
            known = known || strcmp(a->kw_names[k], def->kw_names[i]) == 0;
        if (!known)
            rt_error(c, at, "macro '%s' has no parameter '%s'", def->name, a->kw_names[k]);
    }
    enter(c, &(token){.line = at->line, .col = at->col});
    sbuf b = {0};
    exec_body(c, s, def->b, &b);
    c->depth--;
    return v_str(b.d ? b.d : "", b.n);
}

static int exec_node(jctx *c, scope *s, const node *n, sbuf *out)
{
    step(c, n);
    switch (n->kind) {
    case S_TEXT:
        sb_put(c, out, n->name, n->name_len);
        return FLOW_NORMAL;
    case S_OUTPUT: {
        value v = eval(c, s, n->a);
        format_value(c, out, &v, false);
        return FLOW_NORMAL;
    }
    case S_BODY:
        return exec_body(c, s, n, out);
    case S_IF: {
        value cond = eval(c, s, n->a);
        if (truthy(&cond))
            return exec_body(c, s, n->b, out);
        if (!n->c)
            return FLOW_NORMAL;
        return n->c->kind == S_IF ? exec_node(c, s, n->c, out) : exec_body(c, s, n->c, out);
    }
    case S_FOR: {
        enter(c, &(token){.line = n->line, .col = n->col});
        int f = exec_for(c, s, n, out);
        c->depth--;
        return f;
    }
    case S_SET: {
        value v = eval(c, s, n->a);
        bind_targets(c, s, n, &v);
        return FLOW_NORMAL;
    }
    case S_SET_ATTR: {
        value ns = lookup(c, s, n->name);
        if (ns.t != V_DICT || !ns.u.d->ns)
            rt_error(c, n, "cannot assign attribute on '%s': it is not a namespace()", n->name);
        value v = eval(c, s, n->a);
        dict_set_str(c, ns.u.d, n->targets[0], v);
        return FLOW_NORMAL;
    }
    case S_SET_BLOCK: {
        sbuf b = {0};
        exec_body(c, s, n->b, &b);
        value v = v_str(b.d ? b.d : "", b.n);
        bind_targets(c, s, n, &v);
        return FLOW_NORMAL;
    }
    case S_MACRO: {
        macro *m = arena_alloc(c, sizeof(macro));
        m->def = n;
        m->closure = s;
        s->captured = true;
        dict_set_str(c, &s->vars, n->name, (value){.t = V_MACRO, .u.m = m});
        return FLOW_NORMAL;
    }
    case S_BREAK:
        return FLOW_BREAK;
    case S_CONTINUE:
        return FLOW_CONTINUE;
    default:
        rt_error(c, n, "internal error: not a statement");
    }
}

/* ---------------------------------------------------------------- entry points */

static value from_json(jctx *c, const cJSON *j, int depth)
{
    if (depth > JT_MAX_DEPTH)
        fail_at(c, LOOM_ETOOLONG, 0, 0, "variables nested more than %d levels deep", JT_MAX_DEPTH);
    if (cJSON_IsString(j))
        return v_cstr(j->valuestring);
    if (cJSON_IsBool(j))
        return v_bool(cJSON_IsTrue(j));
    if (cJSON_IsNumber(j)) {
        double d = j->valuedouble;
        /* cJSON keeps no integer/float distinction: integral values in range are ints */
        if (d == floor(d) && fabs(d) < 9007199254740992.0)
            return v_int((int64_t)d);
        return v_float(d);
    }
    if (cJSON_IsArray(j)) {
        vlist *l = list_new(c, 0);
        const cJSON *x;
        cJSON_ArrayForEach(x, j) list_push(c, l, from_json(c, x, depth + 1));
        return v_list(l);
    }
    if (cJSON_IsObject(j)) {
        vdict *d = dict_new_cap(c, (size_t)cJSON_GetArraySize(j) + 1);
        const cJSON *x;
        cJSON_ArrayForEach(x, j)
        { /* appended: a duplicate key keeps its first value */
            d->keys[d->n] = v_cstr(x->string ? x->string : "");
            d->vals[d->n++] = from_json(c, x, depth + 1);
        }
        return v_dict(d);
    }
    return v_none();
}

static void add_globals(jctx *c, scope *g)
{
    static const struct {
        const char *name;
        int fn;
    } funcs[] = {{"raise_exception", F_RAISE},
                 {"namespace", F_NAMESPACE},
                 {"range", F_RANGE},
                 {"strftime_now", F_STRFTIME},
                 {"dict", F_DICT}};
    for (size_t i = 0; i < sizeof(funcs) / sizeof(funcs[0]); i++)
        dict_set_str(c, &g->vars, funcs[i].name, (value){.t = V_FUNC, .u.fn = funcs[i].fn});
}

typedef struct render_input {
    const chat_message *msgs;
    int n_msgs;
    bool add_generation_prompt;
    const char *bos, *eos;
    const cJSON *vars;
} render_input;

static int render(const char *tmpl, const render_input *in, char **out, loom_err *e)
{
    *out = NULL;
    if (!tmpl)
        return loom_errf(e, LOOM_EINVAL, "chat template: no template");
    jctx *c = calloc(1, sizeof(jctx));
    if (!c)
        return loom_errf(e, LOOM_ENOMEM, "chat template: out of memory");
    c->e = e;
    if (setjmp(c->jmp)) {
        int code = c->code;
        arena_free(c);
        free(c);
        return code;
    }
    /* Jinja normalises the template's newlines (\r\n and \r) to \n before lexing */
    size_t len = strlen(tmpl), k = 0;
    char *src = arena_alloc(c, len + 1);
    for (size_t i = 0; i < len; i++) {
        if (tmpl[i] == '\r') {
            src[k++] = '\n';
            if (i + 1 < len && tmpl[i + 1] == '\n')
                i++;
        } else {
            src[k++] = tmpl[i];
        }
    }
    src[k] = 0;
    c->src = src;
    lex(c, src, k);
    node *root = parse_body(c, NULL, cur(c));
    scope *globals = scope_new(c, NULL);
    add_globals(c, globals);
    if (in->vars) {
        const cJSON *x;
        cJSON_ArrayForEach(x, in->vars)
            dict_set_str(c, &globals->vars, x->string, from_json(c, x, 0));
    } else {
        vlist *msgs = list_new(c, (size_t)(in->n_msgs > 0 ? in->n_msgs : 0));
        for (int i = 0; i < in->n_msgs; i++) {
            vdict *m = dict_new(c);
            dict_set_str(c, m, "role", in->msgs[i].role ? v_cstr(in->msgs[i].role) : v_none());
            dict_set_str(c, m, "content",
                         in->msgs[i].content ? v_cstr(in->msgs[i].content) : v_none());
            list_push(c, msgs, v_dict(m));
        }
        dict_set_str(c, &globals->vars, "messages", v_list(msgs));
        dict_set_str(c, &globals->vars, "add_generation_prompt", v_bool(in->add_generation_prompt));
        if (in->bos)
            dict_set_str(c, &globals->vars, "bos_token", v_cstr(in->bos));
        if (in->eos)
            dict_set_str(c, &globals->vars, "eos_token", v_cstr(in->eos));
    }
    scope *top = scope_new(c, globals);
    sbuf b = {0};
    exec_body(c, top, root, &b);
    char *result = malloc(b.n + 1);
    if (!result) {
        arena_free(c);
        free(c);
        return loom_errf(e, LOOM_ENOMEM, "chat template: out of memory");
    }
    if (b.n)
        memcpy(result, b.d, b.n);
    result[b.n] = 0;
    arena_free(c);
    free(c);
    *out = result;
    return LOOM_OK;
}

int chat_template_render(const char *tmpl, const chat_message *msgs, int n_msgs,
                         bool add_generation_prompt, const char *bos_token, const char *eos_token,
                         char **out, loom_err *e)
{
    render_input in = {.msgs = msgs,
                       .n_msgs = n_msgs,
                       .add_generation_prompt = add_generation_prompt,
                       .bos = bos_token,
                       .eos = eos_token};
    return render(tmpl, &in, out, e);
}

int chat_template_render_json(const char *tmpl, const char *vars_json, char **out, loom_err *e)
{
    *out = NULL;
    cJSON *vars = cJSON_Parse(vars_json ? vars_json : "{}");
    if (!cJSON_IsObject(vars)) {
        cJSON_Delete(vars);
        return loom_errf(e, LOOM_EINVAL, "chat template: variables are not a JSON object");
    }
    render_input in = {.vars = vars};
    int rc = render(tmpl, &in, out, e);
    cJSON_Delete(vars);
    return rc;
}
