/*
 * Emulated backend (see loom/emulated.h): real engine, modelled device. A step costs what
 * perf_step_seconds says for its shape on the emulated device, and this thread sleeps until
 * then (absolute deadline on CLOCK_MONOTONIC, so the time spent here counts toward the step).
 *
 * Logits are cheap on purpose, so that many instances share a few host cores: each row is all
 * zeros (written once, when the row is first used) with one spike of +30 at a random non-EOS
 * token, which greedy and temperature sampling alike pick (e^30 outweighs 1e6 zeros). Each step
 * only moves the spikes and re-masks EOS. The engine reads logits without writing them, so the
 * zeros stay valid between steps; a different buffer resets that assumption.
 */
#include "loom/emulated.h"
#include "loom/perf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SPIKE 30.0f
#define EOS_MASK -1e9f

typedef struct emu_backend {
    perf_catalog catalog; /* owns the device record setup points into */
    perf_model model;
    perf_setup setup;
    int vocab;
    int n_eos;
    int eos[8];
    int n_layers, n_experts;
    loom_rng rng;
    const float *rows_base; /* the logits buffer the rows below refer to */
    int rows_ready;         /* rows of it already zeroed */
    int32_t *spike;         /* (rows_cap) spike position per row, -1 none */
    int rows_cap;
    double overshoot;   /* EMA of how late the sleeps wake, subtracted from deadlines */
    double last_return;   /* when forward last returned (0 before the first step) */
    double last_deadline; /* modelled end of the previous step (0 before the first) */
    emulated_stats stats;
} emu_backend;

static double mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_until(double deadline)
{
    struct timespec ts;
    ts.tv_sec = (time_t)deadline;
    ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static bool is_eos(const emu_backend *eb, int32_t tok)
{
    for (int i = 0; i < eb->n_eos; i++)
        if (eb->eos[i] == tok)
            return true;
    return false;
}

static void write_logits(emu_backend *eb, int n_rows, float *logits)
{
    size_t V = (size_t)eb->vocab;
    if (logits != eb->rows_base) {
        eb->rows_base = logits;
        eb->rows_ready = 0;
    }
    if (n_rows > eb->rows_cap) {
        eb->spike = xrealloc(eb->spike, sizeof(int32_t) * (size_t)n_rows);
        for (int i = eb->rows_cap; i < n_rows; i++)
            eb->spike[i] = -1;
        eb->rows_cap = n_rows;
    }
    for (int r = 0; r < n_rows; r++) {
        float *row = logits + (size_t)r * V;
        if (r >= eb->rows_ready) {
            memset(row, 0, V * sizeof(float));
            eb->spike[r] = -1;
        } else if (eb->spike[r] >= 0) {
            row[eb->spike[r]] = 0.0f;
        }
        int32_t tok;
        int tries = 0;
        do {
            tok = (int32_t)(rng_next(&eb->rng) % V);
        } while (is_eos(eb, tok) && ++tries < 16 && (size_t)eb->n_eos < V);
        row[tok] = SPIKE;
        eb->spike[r] = tok;
        for (int i = 0; i < eb->n_eos; i++)
            if (eb->eos[i] >= 0 && (size_t)eb->eos[i] < V && eb->eos[i] != tok)
                row[eb->eos[i]] = EOS_MASK;
    }
    if (n_rows > eb->rows_ready)
        eb->rows_ready = n_rows;
}

static int emu_forward(void *ctx, const model_batch *b, float *logits, loom_err *e)
{
    emu_backend *eb = ctx;
    double t0 = mono_now();
    perf_step st;
    memset(&st, 0, sizeof(st));
    /* a sequence adding one token decodes; one adding more is a prompt chunk, which samples
     * when its last row is among the logit rows (rows are in sequence order) */
    int row = 0;
    for (int s = 0; s < b->n_seqs; s++) {
        double n = b->seq_start[s + 1] - b->seq_start[s], c = b->ctx_len[s];
        if (n < 1 || c < 0)
            return loom_errf(e, LOOM_EINVAL, "emulated: malformed batch");
        bool samples = row < b->n_logits && b->logit_rows[row] == b->seq_start[s + 1] - 1;
        row += samples;
        if (n == 1 && samples) {
            st.decode_seqs += 1;
            st.decode_ctx += c;
        } else {
            st.prefill_tokens += n;
            st.prefill_seqs += 1;
            st.prefill_logits += samples;
            st.prefill_pairs += c * n + n * (n + 1) / 2;
            st.prefill_kv_read += c + n;
        }
    }
    double secs = perf_step_seconds(&eb->setup, &st, NULL);

    if (b->n_logits > 0)
        write_logits(eb, b->n_logits, logits);
    if (b->router_logits) {
        for (int l = 0; l < eb->n_layers; l++)
            if (b->router_logits[l])
                memset(b->router_logits[l], 0,
                       sizeof(float) * (size_t)b->n_tokens * (size_t)eb->n_experts);
    }

    /* The modelled time covers the whole step, the engine's own scheduling and sampling
     * included (the overhead coefficient), so step k ends at end(k-1) + secs: deadlines are
     * chained from the previous deadline, not from when the previous sleep woke, and a late
     * wake-up (timer slack, a busy core) is taken out of the next step instead of adding up
     * over thousands of steps. A gap far longer than a step is idleness (no work), not engine
     * time: the chain restarts there. A host slower than the model (the deadline already past)
     * restarts it too, so no debt is paid back by a burst of short steps later. */
    double gap = eb->last_return > 0 ? t0 - eb->last_return : 0;
    double anchor = eb->last_deadline > 0 && gap >= 0 && gap <= 10 * secs + 0.05
                        ? eb->last_deadline
                        : t0;
    double deadline = anchor + secs;
    double now = mono_now();
    if (deadline - eb->overshoot > now) {
        sleep_until(deadline - eb->overshoot);
        double late = mono_now() - (deadline - eb->overshoot);
        eb->overshoot = 0.9 * eb->overshoot + 0.1 * late;
        if (eb->overshoot > 1e-3) /* never trust more than 1 ms of correction */
            eb->overshoot = 1e-3;
        if (eb->overshoot < 0)
            eb->overshoot = 0;
    } else if (deadline < now) {
        deadline = now; /* host-bound step: restart the chain here */
    }
    eb->last_deadline = deadline;
    eb->last_return = mono_now();
    eb->stats.steps++;
    eb->stats.modelled_seconds += secs;
    eb->stats.last_step_seconds = secs;
    return LOOM_OK;
}

static void emu_destroy(void *ctx)
{
    emu_backend *eb = ctx;
    if (!eb)
        return;
    perf_catalog_free(&eb->catalog);
    free(eb->spike);
    free(eb);
}

/* The catalog, the device and a setup with the memory verdict for (mc, device, tp). */
static int emu_setup(emu_backend *eb, const model_config *mc, const char *device, int tp,
                     const char *catalog_path, int block_size, int max_num_seqs,
                     int max_num_batched_tokens, double mem_utilization, perf_memory *mem,
                     loom_err *e)
{
    int rc = perf_catalog_load(catalog_path, &eb->catalog, e);
    if (rc)
        return rc;
    const perf_device *dev = perf_catalog_find(&eb->catalog, device);
    if (!dev)
        return loom_errf(e, LOOM_ENOTFOUND, "emulated: unknown device '%s' (see %s)",
                         device ? device : "", eb->catalog.path ? eb->catalog.path : "catalog");
    if ((rc = perf_model_init(&eb->model, mc, mc->model_type, dev->weight_bytes, dev->weight_bytes,
                              e)))
        return rc;
    char why[160];
    if (!perf_tp_valid(&eb->model, dev, tp, why, sizeof(why)))
        return loom_errf(e, LOOM_EINVAL, "emulated: --tp %s", why);
    perf_setup_init(&eb->setup, &eb->model, dev, tp);
    if (block_size > 0)
        eb->setup.limits.block_size = block_size;
    /* the engine's limits size the activation reserve, hence what is left for KV */
    if (max_num_seqs > 0)
        eb->setup.limits.max_num_seqs = max_num_seqs;
    if (max_num_batched_tokens > 0)
        eb->setup.limits.max_num_batched_tokens = max_num_batched_tokens;
    if (mem_utilization > 0)
        eb->setup.limits.mem_utilization = mem_utilization;
    perf_lengths one = {1, 1, 1};
    perf_memory_plan(&eb->setup, &one, mem);
    if (!mem->fits)
        return loom_errf(e, LOOM_EINVAL, "emulated: the model does not fit on %d x %s: %s", tp,
                         dev->name, mem->why);
    return LOOM_OK;
}

int engine_backend_emulated_capacity(const model_config *mc, const char *device, int tp,
                                     const char *catalog_path, int block_size, int max_num_seqs,
                                     int max_num_batched_tokens, double mem_utilization,
                                     int64_t *num_blocks, loom_err *e)
{
    emu_backend eb;
    memset(&eb, 0, sizeof(eb));
    perf_memory mem;
    int rc = emu_setup(&eb, mc, device, tp, catalog_path, block_size, max_num_seqs,
                       max_num_batched_tokens, mem_utilization, &mem, e);
    if (!rc)
        *num_blocks = mem.kv_blocks;
    perf_catalog_free(&eb.catalog);
    return rc;
}

int engine_backend_emulated_create(const model_config *mc, const char *device, int tp,
                                   const char *catalog_path, int num_blocks, int block_size,
                                   int max_num_seqs, int max_num_batched_tokens,
                                   engine_backend *out, loom_err *e)
{
    if (num_blocks < 1 || block_size < 1)
        return loom_errf(e, LOOM_EINVAL, "emulated: num_blocks and block_size must be >= 1");
    emu_backend *eb = xcalloc(1, sizeof(*eb));
    perf_memory mem;
    int rc = emu_setup(eb, mc, device, tp, catalog_path, block_size, max_num_seqs,
                       max_num_batched_tokens, 0, &mem, e);
    if (!rc && num_blocks > mem.kv_blocks)
        rc = loom_errf(e, LOOM_EINVAL,
                       "emulated: %d x %s holds at most %lld KV blocks of %d tokens for this "
                       "model; ask for at most that many",
                       tp, eb->setup.device->name, (long long)mem.kv_blocks, block_size);
    if (rc) {
        emu_destroy(eb);
        return rc;
    }
    eb->vocab = mc->vocab_size;
    eb->n_eos = mc->n_eos > 8 ? 8 : (mc->n_eos > 0 ? mc->n_eos : 0);
    memcpy(eb->eos, mc->eos_token_ids, sizeof(int) * (size_t)eb->n_eos);
    eb->n_layers = mc->n_layers;
    eb->n_experts = mc->n_experts;
    rng_seed(&eb->rng, 0x5eed0e11a7edULL ^ (uint64_t)tp);
    out->name = "emulated";
    out->ctx = eb;
    out->forward = emu_forward;
    out->destroy = emu_destroy;
    return LOOM_OK;
}

void engine_backend_emulated_stats(const void *ctx, emulated_stats *out)
{
    const emu_backend *eb = ctx;
    *out = eb->stats;
}
