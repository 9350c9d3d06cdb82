/*
 * sampling: token selection from one row of logits. Pure functions of (logits, params, rng state)
 * so that a seeded request draws the same tokens however it is batched. Order of the processing
 * follows vLLM: temperature, top_k, top_p, then one uniform draw over the kept tokens.
 *
 * Ranking is by logit, ties to the lower token id, everywhere (argmax, top_k, top_p, top-N
 * logprobs), so greedy, top_k = 1 and a tiny top_p all pick the same token.
 */
#include "loom/engine.h"

#include <math.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define SAMPLING_EPS 1e-5f

/* OpenAI/vLLM defaults: temperature 1, no top_p/top_k, 16 tokens. */
void sampling_params_default(sampling_params *p)
{
    memset(p, 0, sizeof(*p));
    p->temperature = 1.0f;
    p->top_p = 1.0f;
    p->top_k = 0;
    p->seed = -1;
    p->max_tokens = 16;
    p->min_tokens = 0;
    p->ignore_eos = false;
    p->logprobs = -1;
    p->skip_special_tokens = true;
}

/* a ranks before b: larger key, or the same key and a lower id. */
static inline bool ranks_before(const float *key, int32_t a, int32_t b)
{
    return key[a] > key[b] || (key[a] == key[b] && a < b);
}

/* heap[0..n) is a heap whose root ranks last (the worst kept token). */
static void sift_down(int32_t *heap, int n, int i, const float *key)
{
    for (;;) {
        int worst = i, l = 2 * i + 1, r = l + 1;
        if (l < n && ranks_before(key, heap[worst], heap[l]))
            worst = l;
        if (r < n && ranks_before(key, heap[worst], heap[r]))
            worst = r;
        if (worst == i)
            return;
        int32_t t = heap[i];
        heap[i] = heap[worst];
        heap[worst] = t;
        i = worst;
    }
}

static void heapify(int32_t *heap, int n, const float *key)
{
    for (int i = n / 2 - 1; i >= 0; i--)
        sift_down(heap, n, i, key);
}

/* Sorts a heap in place into ranking order (best first). */
static void heap_sort(int32_t *heap, int n, const float *key)
{
    for (int end = n - 1; end > 0; end--) {
        int32_t t = heap[0];
        heap[0] = heap[end];
        heap[end] = t;
        sift_down(heap, end, 0, key);
    }
}

/* The k best ids of key[0..n) into out[0..k), in ranking order. */
static void select_top(const float *key, int n, int k, int32_t *out)
{
    for (int i = 0; i < k; i++)
        out[i] = i;
    heapify(out, k, key);
    for (int32_t i = k; i < n; i++) {
        if (ranks_before(key, i, out[0])) {
            out[0] = i;
            sift_down(out, k, 0, key);
        }
    }
    heap_sort(out, k, key);
}

int32_t sampling_argmax_ref(const float *logits, int n_vocab)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n_vocab; i++)
        if (logits[i] > logits[best])
            best = i;
    return best;
}

/*
 * Greedy decoding calls this once per sequence per step over the whole vocabulary, so it is on
 * the hot path of every instance (and the main host cost of emulated ones). Two passes: the
 * maximum with SSE (baseline x86-64, four independent lanes x4 accumulators), then the first
 * index holding it (SSE compares, 16 at a time). A NaN anywhere makes the SSE maximum order-dependent, so that case (never
 * seen with finite logits) falls back to the reference loop, which is the definition.
 */
int32_t sampling_argmax(const float *logits, int n_vocab)
{
#if defined(__SSE2__)
    if (n_vocab >= 32) {
        __m128 m0 = _mm_loadu_ps(logits), m1 = m0, m2 = m0, m3 = m0;
        __m128 nan = _mm_setzero_ps();
        int i = 0;
        for (; i + 16 <= n_vocab; i += 16) {
            __m128 a = _mm_loadu_ps(logits + i), b = _mm_loadu_ps(logits + i + 4);
            __m128 c = _mm_loadu_ps(logits + i + 8), d = _mm_loadu_ps(logits + i + 12);
            nan = _mm_or_ps(nan, _mm_or_ps(_mm_cmpunord_ps(a, b), _mm_cmpunord_ps(c, d)));
            m0 = _mm_max_ps(m0, a);
            m1 = _mm_max_ps(m1, b);
            m2 = _mm_max_ps(m2, c);
            m3 = _mm_max_ps(m3, d);
        }
        if (_mm_movemask_ps(nan))
            return sampling_argmax_ref(logits, n_vocab);
        m0 = _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3));
        float lanes[4];
        _mm_storeu_ps(lanes, m0);
        float max = lanes[0];
        for (int k = 1; k < 4; k++)
            max = lanes[k] > max ? lanes[k] : max;
        for (; i < n_vocab; i++) {
            if (isnan(logits[i]))
                return sampling_argmax_ref(logits, n_vocab);
            max = logits[i] > max ? logits[i] : max;
        }
        __m128 mv = _mm_set1_ps(max);
        int32_t j = 0;
        for (; j + 16 <= n_vocab; j += 16) {
            int hit = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(logits + j), mv)) |
                      _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(logits + j + 4), mv)) << 4 |
                      _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(logits + j + 8), mv)) << 8 |
                      _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(logits + j + 12), mv)) << 12;
            if (hit)
                return j + __builtin_ctz((unsigned)hit);
        }
        for (; j < n_vocab; j++)
            if (logits[j] == max)
                return j;
    }
#endif
    return sampling_argmax_ref(logits, n_vocab);
}

bool sampling_is_greedy(const sampling_params *p)
{
    return p->temperature < SAMPLING_EPS || p->top_k == 1;
}

int32_t sampling_sample(float *logits, int n_vocab, const sampling_params *p, loom_rng *rng,
                        int32_t *work)
{
    if (p->temperature < SAMPLING_EPS)
        return sampling_argmax(logits, n_vocab);
    int k = p->top_k > 0 && p->top_k < n_vocab ? p->top_k : n_vocab;
    if (k == 1)
        return sampling_argmax(logits, n_vocab);
    float max = logits[sampling_argmax(logits, n_vocab)];
    if (!isfinite(max))
        return sampling_argmax(logits, n_vocab);
    float inv_t = 1.0f / p->temperature;
    bool top_p = p->top_p > 0 && p->top_p < 1;

    /* Candidates, best first, in work[0..n); probabilities (unnormalised) into logits. */
    int n;
    if (k < n_vocab) {
        select_top(logits, n_vocab, k, work);
        n = k;
        for (int i = 0; i < n; i++)
            logits[work[i]] = expf((logits[work[i]] - max) * inv_t);
    } else {
        double sum = 0;
        for (int i = 0; i < n_vocab; i++) {
            logits[i] = expf((logits[i] - max) * inv_t);
            sum += logits[i];
        }
        if (!top_p) {
            /* Plain temperature sampling: walk the vocabulary in id order. */
            double u = rng_uniform(rng) * sum, acc = 0;
            int32_t last = 0;
            for (int32_t i = 0; i < n_vocab; i++) {
                if (logits[i] <= 0)
                    continue;
                acc += logits[i];
                last = i;
                if (u < acc)
                    return i;
            }
            return last;
        }
        /* Only tokens with probability >= (1 - top_p) / V can be in the nucleus: the ones below
         * hold less than 1 - top_p of the mass together, so the sorted prefix reaches top_p
         * before it gets to them. Sorting just the rest keeps peaked distributions cheap. */
        float threshold = (float)((1.0 - p->top_p) * sum / n_vocab);
        n = 0;
        for (int32_t i = 0; i < n_vocab; i++)
            if (logits[i] >= threshold && logits[i] > 0)
                work[n++] = i;
        heapify(work, n, logits);
        heap_sort(work, n, logits);
    }

    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += logits[work[i]];
    if (top_p) {
        double target = p->top_p * sum, acc = 0;
        int m = 0;
        while (m < n) {
            acc += logits[work[m++]];
            if (acc >= target)
                break;
        }
        n = m;
        sum = acc;
    }
    double u = rng_uniform(rng) * sum, acc = 0;
    for (int i = 0; i < n; i++) {
        acc += logits[work[i]];
        if (u < acc)
            return work[i];
    }
    return work[n - 1];
}

float sampling_logprobs(const float *logits, int n_vocab, int32_t token, int n_top,
                        engine_logprob *top)
{
    float max = logits[sampling_argmax(logits, n_vocab)];
    double sum = 0;
    for (int i = 0; i < n_vocab; i++)
        sum += exp((double)logits[i] - max);
    float lse = max + (float)log(sum);
    if (n_top > n_vocab)
        n_top = n_vocab;
    if (n_top > 0) {
        int32_t ids[ENGINE_MAX_LOGPROBS];
        if (n_top > ENGINE_MAX_LOGPROBS)
            n_top = ENGINE_MAX_LOGPROBS;
        select_top(logits, n_vocab, n_top, ids);
        for (int i = 0; i < n_top; i++) {
            top[i].token = ids[i];
            top[i].logprob = logits[ids[i]] - lse;
        }
    }
    return logits[token] - lse;
}
