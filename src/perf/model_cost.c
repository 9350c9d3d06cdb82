/*
 * Model cost: parameter counts split by how a step touches them, and the FLOPs, bytes and
 * all-reduce traffic of one engine step on one device of a tp-way instance.
 *
 * Letters: d hidden, H heads, Hkv KV heads, hd head dim (q = H hd, kv = Hkv hd), I dense FFN
 * width, E experts, k experts per token, Ie expert width, Is shared-expert width, L layers,
 * V vocab, T tokens in the step, t the tensor-parallel degree.
 *
 *   FLOPs      2 T (attention + dense MLP + k experts + shared) params + 2 n_logits V d
 *              + 4 H hd L attn_pairs                       (QK^T and PV, 2 FLOPs per MAC)
 *              the decode tokens' attention pairs are a term of their own (t_attention): on a
 *              CPU they are dot products over the cache, not GEMMs
 *   weights    every non-expert weight once per step; of each MoE layer's E experts, the
 *              expected number touched by T tokens under uniform routing,
 *              E (1 - (1 - k/E)^T)
 *   KV         (kv_read_tokens + T) x 2 L Hkv hd bytes      (read the cache, write the new rows)
 *   comm       two all-reduces of T d activations per layer (after attention and after the
 *              MLP, Megatron-style), plus an all-gather of the logits
 */
#include "loom/perf.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* The rule of model_config_is_moe_layer, restated here because perf depends on base only. */
static bool is_moe_layer(const model_config *c, int layer)
{
    if (c->n_experts <= 0)
        return false;
    if (c->arch != ARCH_QWEN2_MOE)
        return true;
    for (int i = 0; i < c->n_mlp_only_layers; i++)
        if (c->mlp_only_layers[i] == layer)
            return false;
    return c->decoder_sparse_step > 0 && (layer + 1) % c->decoder_sparse_step == 0;
}

int perf_model_init(perf_model *pm, const model_config *mc, const char *name, int weight_bytes,
                    int kv_bytes, loom_err *e)
{
    memset(pm, 0, sizeof(*pm));
    if (mc->n_layers < 1 || mc->hidden_size < 1 || mc->n_heads < 1 || mc->n_kv_heads < 1 ||
        mc->head_dim < 1 || mc->vocab_size < 1 || mc->n_experts < 0 ||
        mc->n_experts_per_tok > mc->n_experts || (mc->n_experts > 0 && mc->n_experts_per_tok < 1))
        return loom_errf(e, LOOM_EINVAL, "model config has non-positive sizes");
    if (weight_bytes < 1 || weight_bytes > 8 || kv_bytes < 1 || kv_bytes > 8)
        return loom_errf(e, LOOM_EINVAL, "bytes per weight and per KV element must be 1..8");
    snprintf(pm->name, sizeof(pm->name), "%s", name ? name : mc->model_type);
    pm->n_layers = mc->n_layers;
    pm->hidden = mc->hidden_size;
    pm->n_heads = mc->n_heads;
    pm->n_kv_heads = mc->n_kv_heads;
    pm->head_dim = mc->head_dim;
    pm->vocab = mc->vocab_size;
    pm->n_experts = mc->n_experts;
    pm->n_experts_per_tok = mc->n_experts_per_tok;
    pm->weight_bytes = weight_bytes;
    pm->kv_bytes = kv_bytes;

    double d = mc->hidden_size, q = (double)mc->n_heads * mc->head_dim,
           kv = (double)mc->n_kv_heads * mc->head_dim;
    double attn = 2 * d + d * (q + 2 * kv) + q * d + (mc->attention_bias ? q + 2 * kv : 0);
    double width_sum = 0;
    for (int l = 0; l < mc->n_layers; l++) {
        pm->params_attn += attn;
        if (is_moe_layer(mc, l)) {
            double Ie = mc->moe_intermediate_size, Is = mc->shared_expert_intermediate_size;
            pm->n_moe_layers++;
            pm->params_expert = 3 * d * Ie;
            pm->params_shared += (double)mc->n_experts * d + (Is > 0 ? 3 * d * Is + d : 0);
            width_sum += mc->n_experts_per_tok * Ie + Is;
        } else {
            pm->params_dense_mlp += 3 * d * mc->intermediate_size;
            width_sum += mc->intermediate_size;
        }
    }
    pm->ffn_active_width = width_sum / mc->n_layers;
    pm->params_embed = (double)mc->vocab_size * d;
    pm->params_lm_head = (double)mc->vocab_size * d;
    pm->params_total = pm->params_embed + (mc->tie_word_embeddings ? 0 : pm->params_lm_head) + d +
                       pm->params_attn + pm->params_dense_mlp + pm->params_shared +
                       (double)pm->n_moe_layers * mc->n_experts * pm->params_expert;
    pm->kv_bytes_per_token = 2.0 * mc->n_layers * kv * kv_bytes;
    return LOOM_OK;
}

double perf_model_weight_bytes(const perf_model *pm)
{
    return pm->params_total * pm->weight_bytes;
}

void perf_step_prefill(perf_step *s, double n_tokens, double mean_len, double mean_len_sq)
{
    if (mean_len < 1)
        mean_len = 1;
    if (mean_len_sq < mean_len * mean_len)
        mean_len_sq = mean_len * mean_len;
    memset(s, 0, sizeof(*s));
    s->prefill_tokens = n_tokens;
    s->prefill_seqs = n_tokens / mean_len;
    s->prefill_logits = s->prefill_seqs;
    /* A token at position i (1-based) of its prompt attends to i positions: a prompt of l
     * tokens has l(l+1)/2 pairs; per token on average (E[l^2] + E[l]) / (2 E[l]). */
    s->prefill_pairs = n_tokens * (mean_len_sq + mean_len) / (2 * mean_len);
    s->prefill_kv_read = n_tokens;
}

void perf_step_decode(perf_step *s, double batch, double ctx_tokens)
{
    memset(s, 0, sizeof(*s));
    s->decode_seqs = batch;
    s->decode_ctx = ctx_tokens;
}

void perf_step_add(perf_step *s, const perf_step *t)
{
    s->prefill_tokens += t->prefill_tokens;
    s->prefill_seqs += t->prefill_seqs;
    s->prefill_logits += t->prefill_logits;
    s->prefill_pairs += t->prefill_pairs;
    s->prefill_kv_read += t->prefill_kv_read;
    s->decode_seqs += t->decode_seqs;
    s->decode_ctx += t->decode_ctx;
}

double perf_step_tokens(const perf_step *s)
{
    return s->prefill_tokens + s->decode_seqs;
}

double perf_allreduce_seconds(double bytes, int tp, double alpha, double beta)
{
    if (tp <= 1 || bytes <= 0)
        return 0;
    double steps = 2.0 * (tp - 1);
    return steps * alpha + (beta > 0 ? steps / tp * bytes / beta : 0);
}

/* Expected experts touched by T tokens each picking k of E uniformly. */
static double experts_touched(double E, double k, double T)
{
    if (E <= 0 || T <= 0)
        return 0;
    if (k >= E)
        return E;
    return E * (1.0 - pow(1.0 - k / E, T));
}

void perf_step_terms(const perf_model *pm, const perf_device *dev, int tp, const perf_step *s,
                     perf_terms *out)
{
    memset(out, 0, sizeof(*out));
    double t = tp > 0 ? tp : 1;
    double d = pm->hidden, q = (double)pm->n_heads * pm->head_dim,
           kv = (double)pm->n_kv_heads * pm->head_dim, L = pm->n_layers, V = pm->vocab;
    double wb = pm->weight_bytes;
    double P = s->prefill_tokens, D = s->decode_seqs, T = P + D;
    double logits = s->prefill_logits + D;
    /* a decode token attends to its cached positions and itself */
    double decode_pairs = s->decode_ctx + D;

    double active = pm->params_attn + pm->params_dense_mlp + pm->params_shared +
                    (double)pm->n_moe_layers * pm->n_experts_per_tok * pm->params_expert;
    double flops_prefill =
        2 * P * active + 2 * s->prefill_logits * pm->params_lm_head + 4 * q * L * s->prefill_pairs;
    double flops_decode = 2 * D * active + 2 * D * pm->params_lm_head;
    double flops_attn = 4 * q * L * decode_pairs;
    out->flops = (flops_prefill + flops_decode + flops_attn) / t;
    out->sampled = logits;

    double touched = experts_touched(pm->n_experts, pm->n_experts_per_tok, T);
    double weights = pm->params_attn + pm->params_dense_mlp + pm->params_shared +
                     (double)pm->n_moe_layers * touched * pm->params_expert +
                     (logits > 0 ? pm->params_lm_head + d : 0);      /* + final norm */
    out->weight_bytes = T > 0 ? (weights * wb + T * d * wb) / t : 0; /* + embedding rows */
    out->kv_bytes = (s->prefill_kv_read + decode_pairs + T) * pm->kv_bytes_per_token / t;
    out->act_bytes =
        T * L * wb * (8 * d + (q + 2 * kv + 3 * pm->ffn_active_width) / t) + logits * V * 4 / t;

    if (tp > 1 && !dev->pooled && T > 0) {
        double per_allreduce = T * d * wb, gathered = logits * V * 4;
        out->comm_bytes = 2 * L * per_allreduce + gathered;
        out->comm_steps = (int)(2 * L * 2 * (tp - 1) + (tp - 1));
        out->t_comm =
            2 * L * perf_allreduce_seconds(per_allreduce, tp, dev->link_latency, dev->link_bw) +
            /* all-gather of the logits: half an all-reduce's steps and traffic */
            (tp - 1) * dev->link_latency +
            (dev->link_bw > 0 ? (t - 1) / t * gathered / dev->link_bw : 0);
    }
    out->t_compute_prefill = flops_prefill / t / dev->flops;
    out->t_compute_decode = flops_decode / t / dev->flops;
    out->t_attention = flops_attn / t / dev->flops;
    out->t_compute = out->t_compute_prefill + out->t_compute_decode + out->t_attention;
    out->t_memory = (out->weight_bytes + out->kv_bytes + out->act_bytes) / dev->mem_bw;
}

double perf_coef_apply(const perf_coef *c, const perf_terms *t)
{
    return c->overhead + c->compute_prefill * t->t_compute_prefill +
           c->compute_decode * t->t_compute_decode + c->attention * t->t_attention +
           c->memory * t->t_memory + c->comm * t->t_comm + c->host_token * t->sampled;
}

bool perf_tp_valid(const perf_model *pm, const perf_device *dev, int tp, char *why, size_t cap)
{
    if (tp < 1) {
        snprintf(why, cap, "tp must be >= 1");
        return false;
    }
    if (dev && dev->pooled)
        return true;
    if (pm->n_heads % tp || pm->n_kv_heads % tp) {
        snprintf(why, cap, "%d does not divide %d heads and %d KV heads", tp, pm->n_heads,
                 pm->n_kv_heads);
        return false;
    }
    return true;
}
