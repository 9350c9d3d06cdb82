#!/usr/bin/env bash
# Issue 7, acceptance 5 (the PyTorch side): training throughput on CPU of loom (bench/train, one
# rank) and PyTorch eager (transformers' MixtralForCausalLM, eager attention, f32, AdamW, the
# same load-balancing loss) on the same model — the shakespeare-moe shape — the same batch and
# the same thread count, side by side in one run. Run it where PyTorch and transformers are.
#
#   bench/train_pytorch.sh [THREADS...]        (default: 1 2 4 8)
#   BENCH_TRAIN=build/bench/train BATCH=16 SEQ=128 STEPS=8 bench/train_pytorch.sh 2 8
#
# Both: random token ids, median step time of STEPS after 2 warm-up steps, OMP_NUM_THREADS and
# the library's own thread setting = THREADS. Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH_TRAIN=${BENCH_TRAIN:-build/bench/train}
BATCH=${BATCH:-16} SEQ=${SEQ:-128} STEPS=${STEPS:-8}
THREADS=("$@")
[ ${#THREADS[@]} -gt 0 ] || THREADS=(1 2 4 8)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for n in "${THREADS[@]}"; do
    loom=$(OMP_NUM_THREADS=$n OPENBLAS_NUM_THREADS=$n "$BENCH_TRAIN" --worker --threads "$n" \
           --batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" --warmup 2 | grep '^RESULT' |
           sed 's/.*tokens_s=\([0-9.]*\).*/\1/')
    torch=$(OMP_NUM_THREADS=$n N=$n BATCH=$BATCH SEQ=$SEQ STEPS=$STEPS python3 - <<'PY'
import os, statistics, time, torch
from transformers import MixtralConfig, MixtralForCausalLM
n, B, T, steps = (int(os.environ[k]) for k in ("N", "BATCH", "SEQ", "STEPS"))
torch.set_num_threads(n)
torch.manual_seed(1)
cfg = MixtralConfig(vocab_size=2048, hidden_size=192, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=6, num_key_value_heads=2, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=2048, rope_theta=1e6,
                    tie_word_embeddings=False, output_router_logits=True,
                    router_aux_loss_coef=0.01, attn_implementation="eager")
model = MixtralForCausalLM(cfg).float().train()
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
times = []
for s in range(steps + 2):
    x = torch.randint(0, 2048, (B, T + 1))
    t0 = time.perf_counter()
    out = model(input_ids=x[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), x[:, 1:].flatten()) \
        + cfg.router_aux_loss_coef * out.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if s >= 2:
        times.append(time.perf_counter() - t0)
print(f"{B * T / statistics.median(times):.1f}")
PY
)
    echo "$n $loom $torch" >>"$out"
    echo "threads $n: loom $loom tokens/s, PyTorch eager $torch tokens/s" >&2
done
python3 - "$out" "$BATCH" "$SEQ" "$STEPS" <<'PY'
import sys, torch, transformers, platform
rows = [l.split() for l in open(sys.argv[1])]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"CPU training, shakespeare-moe shape (8.3M parameters), batch {sys.argv[2]} x {sys.argv[3]}, "
      f"median of {sys.argv[4]} steps; {cpu}; PyTorch {torch.__version__}, transformers "
      f"{transformers.__version__} (eager attention, f32)\n")
print("| threads | loom tokens/s | PyTorch eager tokens/s | loom / PyTorch |")
print("|---:|---:|---:|---:|")
for n, a, b in rows:
    print(f"| {n} | {float(a):.0f} | {float(b):.0f} | {float(a) / float(b):.2f}x |")
PY
