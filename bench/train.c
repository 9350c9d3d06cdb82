/*
 * bench/train: training throughput of loom train (forward, backward, all-reduce, AdamW) on the
 * shakespeare-moe shape — 4 layers, d = 192, 6 heads / 2 KV heads, I = 384, 8 experts top-2,
 * vocabulary 2048 — on 1 rank and on R ranks under mpirun (experts spread E/R per rank, tokens
 * exchanged with MPI_Alltoallv), the cores shared out evenly so every row uses the same cores.
 *
 *   build/bench/train [--ranks 1,2] [--cores N] [--batch 16] [--seq-len 128] [--steps 8]
 *                     [--warmup 2] [--data FILE --tokenizer DIR] [--markdown FILE]
 *
 * Each rank count runs in a child process: `mpirun ... -n R build/bench/train --worker ...`
 * (R = 1 too, so every row pays the same start-up and runs under the same launcher). The
 * worker times `steps` optimisation steps after `warmup` untimed ones; tokens/s is the global
 * tokens of a step over the median step time. Tokens are uniform random ids unless --data is
 * given (throughput barely depends on the text; routing balance a little).
 */
#include "loom/base.h"
#include "loom/blas_cpu.h"
#include "loom/model.h"
#include "loom/tensor.h"
#include "loom/tokenizer.h"
#include "loom/train.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct bench_opts {
    int batch, seq_len, steps, warmup, cores;
    int layers, hidden, heads, kv_heads, inter, experts, top_k, vocab;
    const char *data, *tokenizer, *mpirun;
} bench_opts;

typedef struct bench_row {
    int ranks, threads;
    double tokens_s, step_ms, comm_ms, loss0, loss1;
} bench_row;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---------------------------------------------------------------- worker (one rank) */

static int worker(const bench_opts *o, int threads, int argc, char **argv)
{
    loom_err e = {0};
    train_dist dist;
    if (train_dist_init(&dist, &argc, &argv, 0, &e)) {
        fprintf(stderr, "bench/train: %s\n", e.msg);
        return 1;
    }
    tensor_set_threads(threads);
    int R = dist.n_ranks, rc = 1;
    train_model *m = NULL;
    train_data data = {0};
    train_adamw opt = {0};
    tokenizer *tok = NULL;
    double *times = NULL, *comms = NULL;
    if (o->batch % R || o->experts % R) {
        if (dist.rank == 0)
            fprintf(stderr, "bench/train: --batch %d and %d experts must split over %d ranks\n",
                    o->batch, o->experts, R);
        goto out;
    }
    model_config mc;
    if (model_config_preset("mixtral-tiny", &mc, &e)) {
        fprintf(stderr, "bench/train: %s\n", e.msg);
        goto out;
    }
    mc.n_layers = o->layers;
    mc.hidden_size = o->hidden;
    mc.n_heads = o->heads;
    mc.n_kv_heads = o->kv_heads;
    mc.head_dim = o->hidden / o->heads;
    mc.intermediate_size = o->inter;
    mc.n_experts = o->experts;
    mc.n_experts_per_tok = o->top_k;
    mc.arch = o->experts ? ARCH_MIXTRAL : ARCH_LLAMA;
    mc.vocab_size = o->vocab;
    if (mc.max_position_embeddings < o->seq_len)
        mc.max_position_embeddings = o->seq_len;
    if (o->data) {
        if (tokenizer_load_dir(o->tokenizer, &tok, &e) ||
            train_data_load(&data, &o->data, 1, tok, 0.1, &e)) {
            fprintf(stderr, "bench/train: %s\n", e.msg);
            goto out;
        }
        mc.vocab_size = tokenizer_vocab_size(tok);
    } else {
        /* 1M uniform random tokens, the same on every rank */
        loom_rng r;
        rng_seed(&r, 7);
        data.n_tokens = 1 << 20;
        data.n_train = data.n_tokens - data.n_tokens / 10;
        data.tokens = xmalloc((size_t)data.n_tokens * sizeof(int32_t));
        for (int64_t i = 0; i < data.n_tokens; i++)
            data.tokens[i] = (int32_t)(rng_next(&r) % (uint64_t)mc.vocab_size);
    }
    train_config tc;
    train_config_default(&tc, &mc, o->batch / R, o->seq_len);
    tc.aux_coef = o->experts ? 0.01 : 0.0;
    tc.seed = 1;
    if (train_model_create(&tc, &dist, &m, &e)) {
        fprintf(stderr, "bench/train: %s\n", e.msg);
        goto out;
    }
    train_model_init_random(m, 1);
    train_opt_config oc;
    train_opt_config_default(&oc);
    oc.lr = 2e-3;
    oc.warmup = 0;
    oc.steps = o->warmup + o->steps;
    if (train_adamw_init(&opt, &oc, train_model_n_params(m), &e)) {
        fprintf(stderr, "bench/train: %s\n", e.msg);
        goto out;
    }
    train_step_config sc = {.batch = o->batch, .seq_len = o->seq_len, .accum = 1, .seed = 1};
    times = calloc((size_t)o->steps, sizeof(double));
    comms = calloc((size_t)o->steps, sizeof(double));
    double loss0 = 0, loss1 = 0;
    for (int s = 0; s < o->warmup + o->steps; s++) {
        train_step_result r;
        train_dist_barrier(&dist);
        if (train_step(m, &opt, &data, &sc, s, &r, &e)) {
            fprintf(stderr, "bench/train: %s\n", e.msg);
            goto out;
        }
        /* the slowest rank's time is the step's time */
        double t[2] = {r.time, r.comm_time};
        if (R > 1) {
            double all[2 * 64] = {0};
            if (R <= 64) {
                all[2 * dist.rank] = t[0];
                all[2 * dist.rank + 1] = t[1];
                train_dist_allreduce_f64(&dist, all, (size_t)(2 * R));
                for (int i = 0; i < R; i++)
                    if (all[2 * i] > t[0]) {
                        t[0] = all[2 * i];
                        t[1] = all[2 * i + 1];
                    }
            }
        }
        if (s == 0)
            loss0 = r.loss;
        loss1 = r.loss;
        if (s >= o->warmup) {
            times[s - o->warmup] = t[0];
            comms[s - o->warmup] = t[1];
        }
    }
    double step = median(times, o->steps), comm = median(comms, o->steps);
    if (dist.rank == 0)
        printf("RESULT ranks=%d threads=%d tokens_s=%.3f step_ms=%.3f comm_ms=%.3f loss0=%.4f "
               "loss1=%.4f params=%zu\n",
               R, threads, (double)o->batch * o->seq_len / step, step * 1e3, comm * 1e3, loss0,
               loss1, train_model_n_params(m));
    fflush(stdout);
    rc = 0;
out:
    free(times);
    free(comms);
    train_adamw_free(&opt);
    train_data_free(&data);
    train_model_free(m);
    tokenizer_free(tok);
    train_dist_finalize(&dist);
    return rc;
}

/* ---------------------------------------------------------------- driver */

static int run_ranks(const bench_opts *o, const char *self, int R, bench_row *row)
{
    int threads = o->cores / R > 0 ? o->cores / R : 1;
    char cmd[4096];
    int n = snprintf(cmd, sizeof(cmd),
                     "%s -n %d %s --worker --threads %d --batch %d --seq-len %d --steps %d "
                     "--warmup %d --layers %d --hidden %d --heads %d --kv-heads %d "
                     "--intermediate %d --experts %d --top-k %d --vocab %d",
                     o->mpirun, R, self, threads, o->batch, o->seq_len, o->steps, o->warmup,
                     o->layers, o->hidden, o->heads, o->kv_heads, o->inter, o->experts, o->top_k,
                     o->vocab);
    if (o->data)
        n += snprintf(cmd + n, sizeof(cmd) - (size_t)n, " --data '%s' --tokenizer '%s'", o->data,
                      o->tokenizer);
    if (n >= (int)sizeof(cmd) - 1)
        return 1;
    fprintf(stderr, "bench/train: %s\n", cmd);
    FILE *p = popen(cmd, "r");
    if (!p) {
        fprintf(stderr, "bench/train: cannot run %s\n", o->mpirun);
        return 1;
    }
    char line[512];
    bool got = false;
    while (fgets(line, sizeof(line), p))
        if (!strncmp(line, "RESULT ", 7) &&
            sscanf(line,
                   "RESULT ranks=%d threads=%d tokens_s=%lf step_ms=%lf comm_ms=%lf loss0=%lf "
                   "loss1=%lf",
                   &row->ranks, &row->threads, &row->tokens_s, &row->step_ms, &row->comm_ms,
                   &row->loss0, &row->loss1) == 7)
            got = true;
    int st = pclose(p);
    if (!got || st != 0) {
        fprintf(stderr,
                "bench/train: the %d-rank run failed (exit status %d)\nHINT: check that mpirun "
                "works (--mpirun 'mpirun --oversubscribe' when not root)\n",
                R, st);
        return 1;
    }
    return 0;
}

static void print_table(FILE *f, const bench_opts *o, const bench_row *rows, int n)
{
    fprintf(f,
            "Model: %d layers, d = %d, %d/%d heads, I = %d, %d experts top-%d, vocab %d "
            "(the shakespeare-moe shape); global batch %d x %d tokens; AdamW; median of %d "
            "steps after %d warm-up steps; %d cores shared out over the ranks.\n\n",
            o->layers, o->hidden, o->heads, o->kv_heads, o->inter, o->experts, o->top_k,
            o->vocab, o->batch, o->seq_len, o->steps, o->warmup, o->cores);
    fprintf(f, "| ranks | threads/rank | tokens/s | tokens/s per core | step ms | of which MPI "
               "ms | vs 1 rank |\n");
    fprintf(f, "|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < n; i++) {
        const bench_row *r = &rows[i];
        fprintf(f, "| %d | %d | %.0f | %.0f | %.1f | %.1f | %.2fx |\n", r->ranks, r->threads,
                r->tokens_s, r->tokens_s / (r->ranks * r->threads), r->step_ms, r->comm_ms,
                r->tokens_s / rows[0].tokens_s);
    }
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: bench/train [--ranks 1,2] [--cores N] [--batch B] [--seq-len T] [--steps N]\n"
            "                   [--warmup N] [--data FILE --tokenizer DIR] [--mpirun CMD]\n"
            "                   [--markdown FILE]\n"
            "  --ranks LIST     rank counts, comma separated (default 1,2)\n"
            "  --cores N        cores shared out over the ranks: threads/rank = N/R (default: "
            "all)\n"
            "  --batch B        global sequences per step (default 16)\n"
            "  --seq-len T      tokens per sequence (default 128)\n"
            "  --steps N        timed steps, the median is reported (default 8)\n"
            "  --warmup N       untimed steps first (default 2)\n"
            "  --data FILE      text to train on (default: uniform random token ids)\n"
            "  --tokenizer DIR  tokenizer.json for --data\n"
            "  --mpirun CMD     launcher (default 'mpirun --allow-run-as-root --oversubscribe --bind-to\n"
            "                   none': OpenMPI binds a rank to one core otherwise, and a rank's\n"
            "                   threads then share it)\n"
            "  --markdown FILE  also write the table to FILE\n"
            "  shape: --layers 4 --hidden 192 --heads 6 --kv-heads 2 --intermediate 384\n"
            "         --experts 8 --top-k 2 --vocab 2048\n");
}

int main(int argc, char **argv)
{
    tensor_blas_check_cpu(argv);
    bench_opts o = {.batch = 16, .seq_len = 128, .steps = 8, .warmup = 2,
                    .layers = 4, .hidden = 192, .heads = 6, .kv_heads = 2, .inter = 384,
                    .experts = 8, .top_k = 2, .vocab = 2048,
                    .mpirun = "mpirun --allow-run-as-root --oversubscribe --bind-to none"};
    o.cores = (int)sysconf(_SC_NPROCESSORS_ONLN);
    const char *ranks = "1,2", *md = NULL;
    bool is_worker = false;
    int threads = 1;
    struct { const char *flag; int *v; } ints[] = {
        {"--batch", &o.batch}, {"--seq-len", &o.seq_len}, {"--steps", &o.steps},
        {"--warmup", &o.warmup}, {"--cores", &o.cores}, {"--threads", &threads},
        {"--layers", &o.layers}, {"--hidden", &o.hidden}, {"--heads", &o.heads},
        {"--kv-heads", &o.kv_heads}, {"--intermediate", &o.inter}, {"--experts", &o.experts},
        {"--top-k", &o.top_k}, {"--vocab", &o.vocab}};
    for (int i = 1; i < argc; i++) {
        bool done = false;
        for (size_t j = 0; j < sizeof(ints) / sizeof(ints[0]) && !done; j++)
            if (!strcmp(argv[i], ints[j].flag) && i + 1 < argc) {
                *ints[j].v = atoi(argv[++i]);
                done = true;
            }
        if (done)
            continue;
        if (!strcmp(argv[i], "--worker"))
            is_worker = true;
        else if (!strcmp(argv[i], "--ranks") && i + 1 < argc)
            ranks = argv[++i];
        else if (!strcmp(argv[i], "--data") && i + 1 < argc)
            o.data = argv[++i];
        else if (!strcmp(argv[i], "--tokenizer") && i + 1 < argc)
            o.tokenizer = argv[++i];
        else if (!strcmp(argv[i], "--mpirun") && i + 1 < argc)
            o.mpirun = argv[++i];
        else if (!strcmp(argv[i], "--markdown") && i + 1 < argc)
            md = argv[++i];
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (o.batch < 1 || o.seq_len < 2 || o.steps < 1 || o.warmup < 0 || o.cores < 1 ||
        threads < 1 || o.layers < 1 || o.hidden < 2 || o.heads < 1 || o.kv_heads < 1 ||
        o.hidden % o.heads || o.inter < 1 || o.experts < 0 || o.top_k < 1 || o.vocab < 2 ||
        (o.data && !o.tokenizer)) {
        usage(stderr);
        return 2;
    }
    if (is_worker)
        return worker(&o, threads, argc, argv);

    char self[4096];
    ssize_t len = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (len <= 0) {
        fprintf(stderr, "bench/train: cannot find my own executable\n");
        return 1;
    }
    self[len] = 0;
    bench_row rows[16];
    int n = 0;
    for (const char *p = ranks; *p && n < 16;) {
        int R = atoi(p);
        if (R < 1) {
            usage(stderr);
            return 2;
        }
        if (run_ranks(&o, self, R, &rows[n]))
            return 1;
        n++;
        p = strchr(p, ',');
        if (!p)
            break;
        p++;
    }
    print_table(stdout, &o, rows, n);
    if (md) {
        FILE *f = fopen(md, "w");
        if (!f) {
            fprintf(stderr, "bench/train: cannot write %s\n", md);
            return 1;
        }
        print_table(f, &o, rows, n);
        fclose(f);
    }
    return 0;
}
