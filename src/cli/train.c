/*
 * `loom train`: train a (MoE) language model, on one rank or under mpirun with experts spread
 * over the ranks. Argument parsing, logging and wiring only; the work is in src/train.
 *
 *   loom train --model-preset mixtral-tiny --data FILE --tokenizer DIR --steps 200
 *   mpirun -n 4 loom train ... --ranks-per-node 2
 */
#include "cli.h"

#include "loom/base.h"
#include "loom/model.h"
#include "loom/tokenizer.h"
#include "loom/train.h"

#include "loom/tensor.h"


#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loom train (--model-preset NAME | --model-spec FILE.yaml | --init DIR) "
            "--data FILE...\n"
            "                  --tokenizer DIR [options]\n"
            "       mpirun -n R loom train ... [--ranks-per-node N]\n\n"
            "Trains a decoder-only transformer (Llama / Mixtral MoE) with AdamW. Under mpirun the\n"
            "dense gradients are all-reduced and the experts are spread E/R per rank, tokens going\n"
            "to their experts and back with MPI_Alltoallv.\n\n"
            "model:\n"
            "  --model-preset NAME   random init from a preset (%s",
            "");
    for (const char *const *p = model_preset_names(); *p; p++)
        fprintf(f, "%s%s", p == model_preset_names() ? "" : ", ", *p);
    fprintf(f,
            ")\n"
            "  --model-spec FILE     random init, shape from YAML with config.json key names\n"
            "                        (hidden_size, intermediate_size, num_hidden_layers,\n"
            "                        num_attention_heads, num_key_value_heads, head_dim,\n"
            "                        vocab_size, num_local_experts, num_experts_per_tok,\n"
            "                        rope_theta, rms_norm_eps, max_position_embeddings,\n"
            "                        tie_word_embeddings, bos_token_id, eos_token_id; optional\n"
            "                        'preset: NAME' as the base), e.g.\n"
            "                        data/models/shakespeare-moe.yaml\n"
            "  --init DIR            start from a Hugging Face checkpoint directory (config.json\n"
            "                        Llama, Mixtral or loom's own LoomMoeForCausalLM)\n"
            "  --layers N --hidden D --heads H --kv-heads H --intermediate I --experts E\n"
            "  --top-k K             override the preset's or spec's shape (E = 0: dense)\n"
            "  --router NAME         mixtral|topk (renormalised top-k), switch (top-1), gshard,\n"
            "                        hash, locmoe, group_limited, expert_choice (default mixtral).\n"
            "                        Non-Mixtral routers export as LoomMoeForCausalLM, which loom\n"
            "                        serve routes with the same code (expert_choice excepted:\n"
            "                        it needs the whole batch). group_limited moves its balance\n"
            "                        bias after every step (DeepSeek-V3, rate 1e-3); checkpoints\n"
            "                        and exports carry it\n"
            "  --aux-coef X          load-balancing loss coefficient (default 0.01; --init: the\n"
            "                        checkpoint's router_aux_loss_coef)\n"
            "  --z-coef X            router z-loss coefficient (default 0)\n"
            "  --loc-coef X          LocMoE locality loss coefficient (default 0; locmoe: 0.01)\n"
            "  --capacity-factor X   expert capacity factor, 0 = dropless (default 0)\n"
            "  --router-jitter X     Switch jitter: in training the gate sees its input times\n"
            "                        U(1 - X, 1 + X), elementwise (default 0 = off; X < 1;\n"
            "                        not with --router hash)\n"
            "data:\n"
            "  --data FILE           text file (repeat the flag for several)\n"
            "  --tokenizer DIR       directory with tokenizer.json (default: --init DIR)\n"
            "  --val-fraction X      tail of the tokens held out (default 0.1)\n"
            "  --val-every N         validation loss every N steps (default 50; 0 = off)\n"
            "  --val-batches N       batches per validation (default 4)\n"
            "optimisation:\n"
            "  --steps N             optimisation steps (default 100)\n"
            "  --batch B             global sequences per micro-batch (default 8)\n"
            "  --seq-len T           tokens per sequence (default 128)\n"
            "  --accum N             micro-batches per step (default 1)\n"
            "  --lr X --min-lr X     peak and final learning rate (default 3e-3, 3e-4)\n"
            "  --warmup N            linear warmup steps, then cosine (default 10)\n"
            "  --weight-decay X      AdamW decoupled weight decay (default 0.1)\n"
            "  --grad-clip X         global gradient norm clip (default 1; 0 = off)\n"
            "  --seed S              init and data order (default 1)\n"
            "  --threads N           compute threads per rank (default: cores / ranks)\n"
            "parallelism:\n"
            "  --ranks-per-node N    virtual topology: ranks per node (default: all ranks)\n"
            "output:\n"
            "  --log FILE            one JSON object per step (loss, val_loss, routing stats,\n"
            "                        bytes, compute/comm time)\n"
            "  --log-every N         print and log every N steps (default 10)\n"
            "  --plot FILE.png       loss curve through gnuplot at the end\n"
            "  --save FILE           resumable checkpoint at the end (and every --save-every N)\n"
            "  --save-every N        checkpoint period in steps (default 0 = only at the end)\n"
            "  --resume FILE         continue from a checkpoint (same model flags)\n"
            "  --export DIR          write a Hugging Face directory (config.json,\n"
            "                        model.safetensors, tokenizer files) that loom serve loads\n"
            "  --sample-prompt TEXT  at the end, print the greedy continuation of TEXT (the\n"
            "                        oracle for the exported checkpoint in loom serve)\n"
            "  --sample-tokens N     tokens of that continuation (default 32)\n"
            "  --quiet               no progress bar\n"
            "  -h, --help            this text\n");
}

static bool parse_double(const char *s, double lo, double hi, double *out)
{
    if (!s || !*s)
        return false;
    char *end = NULL;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !isfinite(v) || v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

typedef struct opts {
    const char *preset, *spec, *init, *tokenizer, *router, *log, *plot, *save, *resume, *export_dir,
        *sample_prompt;
    const char **data;
    int n_data;
    long long steps, batch, seq_len, accum, warmup, val_every, val_batches, log_every,
        save_every, rpn, threads, seed, sample_tokens;
    long long layers, hidden, heads, kv_heads, inter, experts, top_k;
    double lr, min_lr, wd, clip, aux, z, loc, cf, jitter, val_fraction;
    bool quiet, aux_set, loc_set;
} opts;

enum {
    O_PRESET = 256, O_INIT, O_DATA, O_TOK, O_STEPS, O_SEED, O_BATCH, O_SEQ, O_ACCUM, O_LR,
    O_MINLR, O_WARMUP, O_WD, O_CLIP, O_ROUTER, O_AUX, O_Z, O_LOC, O_CF, O_RPN, O_LOG, O_LOGEVERY,
    O_PLOT, O_EXPORT, O_SAVE, O_SAVEEVERY, O_RESUME, O_VALFRAC, O_VALEVERY, O_VALBATCHES,
    O_THREADS, O_QUIET, O_SAMPLE, O_SAMPLETOK, O_SPEC, O_LAYERS, O_HIDDEN, O_HEADS, O_KVHEADS, O_INTER, O_EXPERTS, O_TOPK, O_JITTER,
};

static int fail(train_dist *d, int code, const char *msg, const char *hint)
{
    if (d->rank == 0) {
        fprintf(stderr, "loom train: %s\n", msg);
        if (hint)
            fprintf(stderr, "HINT: %s\n", hint);
    }
    train_dist_finalize(d);
    return code;
}

static void progress(int step, int steps, double loss, double tok_s)
{
    int w = 30, done = steps > 0 ? (int)((double)step * w / steps) : w;
    fprintf(stderr, "\r[");
    for (int i = 0; i < w; i++)
        fputc(i < done ? '#' : ' ', stderr);
    fprintf(stderr, "] %d/%d loss %.4f %.0f tok/s ", step, steps, loss, tok_s);
    fflush(stderr);
}

static void log_step(FILE *f, train_model *m, int step, const train_step_result *r,
                     double val_loss)
{
    fprintf(f,
            "{\"step\": %d, \"loss\": %.6f, \"ce\": %.6f, \"aux\": %.6f, \"lr\": %.6g, "
            "\"grad_norm\": %.6g, \"tokens\": %lld, \"time\": %.6f, \"comm_time\": %.6f, "
            "\"compute_time\": %.6f",
            step, r->loss, r->ce, r->aux, r->lr, r->grad_norm, (long long)r->tokens, r->time,
            r->comm_time, r->time - r->comm_time);
    if (!isnan(val_loss))
        fprintf(f, ", \"val_loss\": %.6f", val_loss);
    const train_config *c = train_model_config(m);
    if (c->model.n_experts > 0) {
        fprintf(f, ", \"layers\": [");
        for (int l = 0; l < c->model.n_layers; l++) {
            const train_layer_stat *s = train_model_layer_stats(m, l);
            fprintf(f, "%s{\"layer\": %d, \"tokens_per_expert\": [", l ? ", " : "", l);
            for (int x = 0; x < c->model.n_experts && x < 256; x++)
                fprintf(f, "%s%lld", x ? ", " : "", (long long)s->load[x]);
            fprintf(f,
                    "], \"assigned\": %lld, \"dropped\": %lld, \"drop_rate\": %.6f, "
                    "\"load_cv\": %.4f, \"share_local_rank\": %.4f, \"share_local_node\": %.4f, "
                    "\"share_remote\": %.4f, \"bytes_intra_node\": %.0f, "
                    "\"bytes_inter_node\": %.0f}",
                    (long long)s->s.assigned, (long long)s->s.dropped, s->s.drop_rate,
                    s->s.load_cv, s->s.share_rank, s->s.share_node, 1.0 - s->s.share_rank,
                    s->s.bytes_intra_node, s->s.bytes_inter_node);
        }
        fprintf(f, "]");
    }
    fprintf(f, "}\n");
    fflush(f);
}

static int plot(const char *png, const double *loss, const double *val, int n)
{
    char data[] = "/tmp/loom-train-plot-XXXXXX";
    int fd = mkstemp(data);
    if (fd < 0)
        return -1;
    FILE *f = fdopen(fd, "w");
    for (int i = 0; i < n; i++)
        fprintf(f, "%d %.6f\n", i, loss[i]);
    fprintf(f, "\n\n");
    for (int i = 0; i < n; i++)
        if (!isnan(val[i]))
            fprintf(f, "%d %.6f\n", i, val[i]);
    fclose(f);
    FILE *g = popen("gnuplot", "w");
    if (!g) {
        unlink(data);
        return -1;
    }
    fprintf(g,
            "set terminal png size 900,500\nset output '%s'\nset xlabel 'step'\n"
            "set ylabel 'loss (nats/token)'\nset grid\n"
            "plot '%s' index 0 using 1:2 with lines title 'train', "
            "'%s' index 1 using 1:2 with linespoints title 'validation'\n",
            png, data, data);
    int rc = pclose(g);
    unlink(data);
    return rc;
}

/* --sample-prompt: the trainer's own greedy continuation, printed to stdout as one JSON line
 * ({"prompt_ids": [...], "greedy_ids": [...], "text": "..."}) that tests compare with
 * `loom serve` on the export. */
static int sample(train_model *m, const tokenizer *tok, const char *prompt, int n_new,
                  train_dist *dist, loom_err *e)
{
    int32_t *ids = NULL, *out = xmalloc((size_t)n_new * sizeof(int32_t));
    int n = 0, rc = tokenizer_encode(tok, prompt, strlen(prompt), false, &ids, &n, e);
    if (!rc)
        rc = train_greedy(m, ids, n, n_new, out, e);
    if (!rc && dist->rank == 0) {
        char *text = tokenizer_decode(tok, out, n_new, true);
        printf("{\"prompt_ids\": [");
        for (int i = 0; i < n; i++)
            printf("%s%d", i ? ", " : "", ids[i]);
        printf("], \"greedy_ids\": [");
        for (int i = 0; i < n_new; i++)
            printf("%s%d", i ? ", " : "", out[i]);
        printf("], \"text\": \"");
        for (const unsigned char *p = (const unsigned char *)(text ? text : ""); *p; p++) {
            if (*p == '"' || *p == '\\')
                printf("\\%c", *p);
            else if (*p < 0x20)
                printf("\\u%04x", *p);
            else
                putchar(*p);
        }
        printf("\"}\n");
        fflush(stdout);
        free(text);
    }
    free(ids);
    free(out);
    return rc;
}

int cli_train(int argc, char **argv)
{
    opts o = {0};
    o.steps = 100;
    o.batch = 8;
    o.seq_len = 128;
    o.accum = 1;
    o.warmup = 10;
    o.val_every = 50;
    o.val_batches = 4;
    o.log_every = 10;
    o.seed = 1;
    o.lr = 3e-3;
    o.min_lr = 3e-4;
    o.wd = 0.1;
    o.clip = 1.0;
    o.aux = 0.01;
    o.val_fraction = 0.1;
    o.sample_tokens = 32;
    o.layers = o.hidden = o.heads = o.kv_heads = o.inter = o.experts = o.top_k = -1;
    o.data = calloc((size_t)argc + 1, sizeof(char *));
    static const struct option lo[] = {
        {"model-preset", 1, 0, O_PRESET}, {"model-spec", 1, 0, O_SPEC}, {"init", 1, 0, O_INIT}, {"data", 1, 0, O_DATA},
        {"tokenizer", 1, 0, O_TOK}, {"steps", 1, 0, O_STEPS}, {"seed", 1, 0, O_SEED},
        {"batch", 1, 0, O_BATCH}, {"seq-len", 1, 0, O_SEQ}, {"accum", 1, 0, O_ACCUM},
        {"lr", 1, 0, O_LR}, {"min-lr", 1, 0, O_MINLR}, {"warmup", 1, 0, O_WARMUP},
        {"weight-decay", 1, 0, O_WD}, {"grad-clip", 1, 0, O_CLIP}, {"router", 1, 0, O_ROUTER},
        {"aux-coef", 1, 0, O_AUX}, {"z-coef", 1, 0, O_Z}, {"loc-coef", 1, 0, O_LOC},
        {"capacity-factor", 1, 0, O_CF}, {"ranks-per-node", 1, 0, O_RPN}, {"log", 1, 0, O_LOG},
        {"log-every", 1, 0, O_LOGEVERY}, {"plot", 1, 0, O_PLOT}, {"export", 1, 0, O_EXPORT},
        {"save", 1, 0, O_SAVE}, {"save-every", 1, 0, O_SAVEEVERY}, {"resume", 1, 0, O_RESUME},
        {"val-fraction", 1, 0, O_VALFRAC}, {"val-every", 1, 0, O_VALEVERY},
        {"val-batches", 1, 0, O_VALBATCHES}, {"threads", 1, 0, O_THREADS},
        {"quiet", 0, 0, O_QUIET}, {"sample-prompt", 1, 0, O_SAMPLE},
        {"sample-tokens", 1, 0, O_SAMPLETOK}, {"layers", 1, 0, O_LAYERS}, {"hidden", 1, 0, O_HIDDEN},
        {"heads", 1, 0, O_HEADS}, {"kv-heads", 1, 0, O_KVHEADS},
        {"intermediate", 1, 0, O_INTER}, {"experts", 1, 0, O_EXPERTS}, {"top-k", 1, 0, O_TOPK},
        {"router-jitter", 1, 0, O_JITTER},
        {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    int ch;
    optind = 1;
    const char *bad = NULL, *bad_opt = NULL;
    int li = -1;
    while (!bad && (li = -1, ch = getopt_long(argc, argv, "h", lo, &li)) != -1) {
        const char *a = optarg;
        bool ok = true;
        switch (ch) {
        case 'h': usage(stdout); free(o.data); return CLI_EXIT_OK;
        case O_PRESET: o.preset = a; break;
        case O_SPEC: o.spec = a; break;
        case O_INIT: o.init = a; break;
        case O_DATA: o.data[o.n_data++] = a; break;
        case O_TOK: o.tokenizer = a; break;
        case O_ROUTER: o.router = a; break;
        case O_LOG: o.log = a; break;
        case O_PLOT: o.plot = a; break;
        case O_EXPORT: o.export_dir = a; break;
        case O_SAVE: o.save = a; break;
        case O_RESUME: o.resume = a; break;
        case O_QUIET: o.quiet = true; break;
        case O_SAMPLE: o.sample_prompt = a; break;
        case O_SAMPLETOK: ok = cli_parse_int(a, 1, 1 << 20, &o.sample_tokens); break;
        case O_STEPS: ok = cli_parse_int(a, 0, 100000000, &o.steps); break;
        case O_SEED: ok = cli_parse_int(a, 0, INT64_MAX, &o.seed); break;
        case O_BATCH: ok = cli_parse_int(a, 1, 1 << 20, &o.batch); break;
        case O_SEQ: ok = cli_parse_int(a, 2, 1 << 20, &o.seq_len); break;
        case O_ACCUM: ok = cli_parse_int(a, 1, 1 << 20, &o.accum); break;
        case O_WARMUP: ok = cli_parse_int(a, 0, 100000000, &o.warmup); break;
        case O_VALEVERY: ok = cli_parse_int(a, 0, 100000000, &o.val_every); break;
        case O_VALBATCHES: ok = cli_parse_int(a, 1, 100000, &o.val_batches); break;
        case O_LOGEVERY: ok = cli_parse_int(a, 1, 100000000, &o.log_every); break;
        case O_SAVEEVERY: ok = cli_parse_int(a, 0, 100000000, &o.save_every); break;
        case O_RPN: ok = cli_parse_int(a, 1, 1 << 20, &o.rpn); break;
        case O_THREADS: ok = cli_parse_int(a, 1, 1024, &o.threads); break;
        case O_LAYERS: ok = cli_parse_int(a, 1, 1024, &o.layers); break;
        case O_HIDDEN: ok = cli_parse_int(a, 2, 1 << 16, &o.hidden); break;
        case O_HEADS: ok = cli_parse_int(a, 1, 1024, &o.heads); break;
        case O_KVHEADS: ok = cli_parse_int(a, 1, 1024, &o.kv_heads); break;
        case O_INTER: ok = cli_parse_int(a, 1, 1 << 20, &o.inter); break;
        case O_EXPERTS: ok = cli_parse_int(a, 0, 256, &o.experts); break;
        case O_TOPK: ok = cli_parse_int(a, 1, 256, &o.top_k); break;
        case O_LR: ok = parse_double(a, 0, 10, &o.lr); break;
        case O_MINLR: ok = parse_double(a, 0, 10, &o.min_lr); break;
        case O_WD: ok = parse_double(a, 0, 10, &o.wd); break;
        case O_CLIP: ok = parse_double(a, 0, 1e9, &o.clip); break;
        case O_AUX: ok = parse_double(a, 0, 1e3, &o.aux); o.aux_set = true; break;
        case O_Z: ok = parse_double(a, 0, 1e3, &o.z); break;
        case O_LOC: ok = parse_double(a, 0, 1e3, &o.loc); o.loc_set = true; break;
        case O_CF: ok = parse_double(a, 0, 1e3, &o.cf); break;
        case O_JITTER: ok = parse_double(a, 0, 0.999, &o.jitter); break;
        case O_VALFRAC: ok = parse_double(a, 0, 0.9, &o.val_fraction); break;
        default: usage(stderr); free(o.data); return CLI_EXIT_USAGE;
        }
        if (!ok) {
            bad = a;
            bad_opt = li >= 0 ? lo[li].name : "?";
        }
    }
    if (bad) {
        fprintf(stderr, "loom train: invalid value '%s' for --%s\nHINT: run 'loom train --help'\n",
                bad, bad_opt);
        free(o.data);
        return CLI_EXIT_USAGE;
    }

    loom_err e = {0};
    train_dist dist;
    if (train_dist_init(&dist, &argc, &argv, (int)o.rpn, &e)) {
        fprintf(stderr, "loom train: %s\n", e.msg);
        free(o.data);
        return CLI_EXIT_FAIL;
    }
    if (o.threads > 0)
        tensor_set_threads((int)o.threads);
    else if (dist.n_ranks > 1) {
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        tensor_set_threads(cores / dist.n_ranks > 0 ? (int)(cores / dist.n_ranks) : 1);
    }
    int code = CLI_EXIT_USAGE;
    tokenizer *tok = NULL;
    train_model *m = NULL;
    train_data data = {0};
    train_adamw opt = {0};
    FILE *logf = NULL;
    double *hist = NULL, *vhist = NULL;
    if ((o.preset != NULL) + (o.spec != NULL) + (o.init != NULL) != 1) {
        code = fail(&dist, CLI_EXIT_USAGE,
                    "give exactly one of --model-preset, --model-spec and --init",
                    "loom train --help lists the presets; data/models/ has a spec");
        goto out_nodist;
    }
    /* the spec is read before anything else so that a bad one fails at once, in one line */
    model_config spec_mc;
    bool spec_vocab = false;
    if (o.spec && model_config_load_yaml(o.spec, &spec_mc, &spec_vocab, &e)) {
        code = fail(&dist, CLI_EXIT_USAGE, e.msg, NULL);
        goto out_nodist;
    }
    if (o.n_data == 0) {
        code = fail(&dist, CLI_EXIT_USAGE, "no --data FILE", "any UTF-8 text file will do");
        goto out_nodist;
    }
    const char *tok_dir = o.tokenizer ? o.tokenizer : o.init;
    if (!tok_dir) {
        code = fail(&dist, CLI_EXIT_USAGE, "no --tokenizer DIR",
                    "a directory with tokenizer.json, e.g. ../shared/fixtures/tokenizer");
        goto out_nodist;
    }
    if (tokenizer_load_dir(tok_dir, &tok, &e)) {
        code = fail(&dist, CLI_EXIT_USAGE, e.msg, "--tokenizer needs a tokenizer.json");
        goto out_nodist;
    }

    /* model configuration */
    int R = dist.n_ranks;
    if (o.batch % R) {
        code = fail(&dist, CLI_EXIT_USAGE, "--batch must be a multiple of the rank count",
                    "the global batch is split evenly over the ranks");
        goto out_nodist;
    }
    train_config tc;
    int B_local = (int)(o.batch / R);
    if (o.init) {
        if (train_config_from_hf(&tc, o.init, B_local, (int)o.seq_len, &e)) {
            code = fail(&dist, CLI_EXIT_USAGE, e.msg, "--init needs a Hugging Face directory");
            goto out_nodist;
        }
        if (o.aux_set)
            tc.aux_coef = o.aux;
    } else {
        model_config mc;
        if (o.spec) {
            mc = spec_mc;
        } else if (model_config_preset(o.preset, &mc, &e)) {
            code = fail(&dist, CLI_EXIT_USAGE, e.msg, "loom train --help lists the presets");
            goto out_nodist;
        }
        if (!o.spec || !spec_vocab)
            mc.vocab_size = tokenizer_vocab_size(tok);
        if (o.layers > 0) mc.n_layers = (int)o.layers;
        if (o.hidden > 0) mc.hidden_size = (int)o.hidden;
        if (o.heads > 0) mc.n_heads = (int)o.heads;
        if (o.kv_heads > 0) mc.n_kv_heads = (int)o.kv_heads;
        if (o.inter > 0) mc.intermediate_size = (int)o.inter;
        if (o.hidden > 0 || o.heads > 0) mc.head_dim = mc.hidden_size / mc.n_heads;
        if (o.experts >= 0) {
            mc.n_experts = (int)o.experts;
            mc.arch = o.experts ? ARCH_MIXTRAL : ARCH_LLAMA;
            if (o.experts && mc.n_experts_per_tok < 1)
                mc.n_experts_per_tok = 2;
        }
        if (o.top_k > 0) mc.n_experts_per_tok = (int)o.top_k;
        if (mc.max_position_embeddings < o.seq_len)
            mc.max_position_embeddings = (int)o.seq_len;
        if (!o.spec || mc.bos_token_id < 0)
            mc.bos_token_id = tokenizer_bos_id(tok);
        if (!o.spec || mc.n_eos == 0) {
            mc.n_eos = tokenizer_eos_id(tok) >= 0 ? 1 : 0;
            mc.eos_token_ids[0] = tokenizer_eos_id(tok);
        }
        train_config_default(&tc, &mc, B_local, (int)o.seq_len);
        tc.aux_coef = mc.n_experts > 0 ? o.aux : 0;
    }
    if (tokenizer_vocab_size(tok) > tc.model.vocab_size) {
        char msg[256];
        snprintf(msg, sizeof(msg), "the tokenizer has %d tokens, the model's vocabulary %d",
                 tokenizer_vocab_size(tok), tc.model.vocab_size);
        code = fail(&dist, CLI_EXIT_USAGE, msg, "use the tokenizer the checkpoint was trained "
                                                "with");
        goto out_nodist;
    }
    tc.seed = (uint64_t)o.seed;
    tc.z_coef = o.z;
    tc.capacity_factor = o.cf;
    if (o.top_k > 0)
        tc.top_k = (int)o.top_k;
    if (o.router && tc.model.n_experts > 0 && train_config_set_router(&tc, o.router, &e)) {
        code = fail(&dist, CLI_EXIT_USAGE, e.msg, NULL);
        goto out_nodist;
    }
    if (o.top_k > 0 && (!o.router || strcmp(o.router, "switch")))
        tc.top_k = (int)o.top_k;
    tc.loc_coef = o.loc_set ? o.loc : (tc.router == MOE_ROUTER_LOCMOE ? 0.01 : 0.0);
    if (train_model_create(&tc, &dist, &m, &e)) {
        code = fail(&dist, CLI_EXIT_USAGE, e.msg, NULL);
        goto out_nodist;
    }
    if (o.jitter > 0 && train_router_set_jitter(m, (float)o.jitter, &e)) {
        code = fail(&dist, CLI_EXIT_USAGE, e.msg, NULL);
        goto out;
    }
    train_model_init_random(m, tc.seed);
    if (o.init && train_model_load_hf(m, o.init, &e)) {
        code = fail(&dist, CLI_EXIT_USAGE, e.msg, "the checkpoint does not match its config");
        goto out;
    }
    if (train_data_load(&data, o.data, o.n_data, tok, o.val_fraction, &e)) {
        code = fail(&dist, CLI_EXIT_USAGE, e.msg, NULL);
        goto out;
    }
    train_opt_config oc;
    train_opt_config_default(&oc);
    oc.lr = o.lr;
    oc.min_lr = o.min_lr < o.lr ? o.min_lr : o.lr;
    oc.warmup = (int)o.warmup;
    oc.steps = (int)o.steps;
    oc.weight_decay = o.wd;
    oc.grad_clip = o.clip;
    if (train_adamw_init(&opt, &oc, train_model_n_params(m), &e)) {
        code = fail(&dist, CLI_EXIT_FAIL, e.msg, NULL);
        goto out;
    }
    int64_t start = 0;
    uint64_t data_seed = tc.seed;
    if (o.resume && train_checkpoint_load(m, &opt, &start, &data_seed, o.resume, &e)) {
        code = fail(&dist, CLI_EXIT_USAGE, e.msg, "resume with the flags the run started with");
        goto out;
    }
    if (dist.rank == 0 && o.log && !(logf = fopen(o.log, start > 0 ? "a" : "w"))) {
        code = fail(&dist, CLI_EXIT_FAIL, "cannot open the --log file", NULL);
        goto out;
    }
    if (dist.rank == 0)
        fprintf(stderr,
                "loom train: %zu parameters, %d ranks (%d per node), %lld tokens (%lld train), "
                "router %s, steps %lld..%lld\n",
                train_model_n_params(m), R, dist.ranks_per_node, (long long)data.n_tokens,
                (long long)data.n_train,
                tc.model.n_experts ? moe_router_kind_name(tc.router) : "dense", (long long)start,
                o.steps);
    train_step_config sc = {.batch = (int)o.batch, .seq_len = (int)o.seq_len,
                            .accum = (int)o.accum, .seed = data_seed};
    hist = calloc((size_t)o.steps + 1, sizeof(double));
    vhist = calloc((size_t)o.steps + 1, sizeof(double));
    bool bar = !o.quiet && dist.rank == 0 && isatty(STDERR_FILENO);
    double t_start = loom_now(), tokens = 0;
    code = CLI_EXIT_OK;
    for (int s = (int)start; s < o.steps; s++) {
        train_step_result r;
        if (train_step(m, &opt, &data, &sc, s, &r, &e)) {
            code = fail(&dist, CLI_EXIT_FAIL, e.msg, NULL);
            goto out;
        }
        tokens += (double)r.tokens;
        hist[s] = r.loss;
        vhist[s] = NAN;
        double val = NAN;
        bool last = s + 1 == o.steps;
        if (o.val_every > 0 && ((s + 1) % o.val_every == 0 || last)) {
            if (train_evaluate(m, &data, &sc, (int)o.val_batches, &val, &e)) {
                code = fail(&dist, CLI_EXIT_FAIL, e.msg, NULL);
                goto out;
            }
            vhist[s] = val;
        }
        if (dist.rank == 0 && (s % o.log_every == 0 || last || !isnan(val))) {
            if (logf)
                log_step(logf, m, s, &r, val);
            if (!bar || !isnan(val) || last) {
                if (bar)
                    fprintf(stderr, "\n");
                fprintf(stderr,
                        "step %5d  loss %.4f  ce %.4f  lr %.2e  |g| %.3f  %.0f ms (comm %.0f ms)%s",
                        s, r.loss, r.ce, r.lr, r.grad_norm, r.time * 1e3, r.comm_time * 1e3,
                        isnan(val) ? "\n" : "");
                if (!isnan(val))
                    fprintf(stderr, "  val %.4f\n", val);
            }
        }
        if (bar)
            progress(s + 1, (int)o.steps, r.loss, tokens / (loom_now() - t_start));
        if (o.save && o.save_every > 0 && (s + 1) % o.save_every == 0 &&
            train_checkpoint_save(m, &opt, s + 1, data_seed, o.save, &e)) {
            code = fail(&dist, CLI_EXIT_FAIL, e.msg, NULL);
            goto out;
        }
    }
    if (bar)
        fprintf(stderr, "\n");
    if (dist.rank == 0)
        fprintf(stderr, "loom train: %.0f tokens in %.1f s (%.0f tokens/s)\n", tokens,
                loom_now() - t_start, tokens / (loom_now() - t_start + 1e-9));
    if (o.save && train_checkpoint_save(m, &opt, o.steps, data_seed, o.save, &e)) {
        code = fail(&dist, CLI_EXIT_FAIL, e.msg, NULL);
        goto out;
    }
    if (o.export_dir) {
        if (train_export_hf(m, o.export_dir, tok_dir, &e)) {
            code = fail(&dist, CLI_EXIT_FAIL, e.msg, NULL);
            goto out;
        }
        if (dist.rank == 0)
            fprintf(stderr, "loom train: exported %s (loom serve --model %s)\n", o.export_dir,
                    o.export_dir);
    }
    if (o.sample_prompt && sample(m, tok, o.sample_prompt, (int)o.sample_tokens, &dist, &e)) {
        code = fail(&dist, CLI_EXIT_FAIL, e.msg, NULL);
        goto out;
    }
    if (o.plot && dist.rank == 0 && o.steps > start &&
        plot(o.plot, hist + start, vhist + start, (int)(o.steps - start)) != 0)
        fprintf(stderr, "loom train: gnuplot failed; no plot written (HINT: apt-get install "
                        "gnuplot-nox)\n");
    train_dist_finalize(&dist);
out:
out_nodist:
    if (logf)
        fclose(logf);
    free(hist);
    free(vhist);
    train_adamw_free(&opt);
    train_data_free(&data);
    train_model_free(m);
    tokenizer_free(tok);
    free(o.data);
    return code;
}
