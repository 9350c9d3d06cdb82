#!/usr/bin/env bash
# Issue 7, acceptance 4, the Hugging Face side (run where PyTorch and transformers are, e.g. the
# H200 host): (1) train transformers' MixtralForCausalLM of exactly the shape loom exported
# (config.json of EXPORT) on the same token stream, split and budget as bench/train_shakespeare.sh
# — AdamW lr 2e-3 betas 0.9/0.95 wd 0.1, warmup 20 then cosine to 2e-4, clip 1, aux 0.02, f32,
# batch 16 x 256, validation every 20 steps on 16 fixed batches of the held-out tail — and print
# its validation loss by tokens seen; (2) load loom's export with from_pretrained and check that
# its greedy continuation of the prompt equals the trainer's (GREEDY, greedy.json from
# `loom train --sample-prompt`).
#
#   EXPORT=/tmp/loom-shakespeare/export GREEDY=/tmp/loom-shakespeare/greedy.json \
#   TOKENS=tokens.i32 bench/train_shakespeare_hf.sh
#
# TOKENS: the token stream as int32 (what loom's train_data_load produces: tinyshakespeare
# through the fixtures' tokenizer, last 10% held out); without it, tokenizers encodes TEXT
# (default ../shared/data/tinyshakespeare.txt) with EXPORT/tokenizer.json.
set -euo pipefail
: "${EXPORT:?set EXPORT to the directory loom train exported}"
STEPS=${STEPS:-240} BATCH=${BATCH:-16} SEQ=${SEQ:-256} TEXT=${TEXT:-../shared/data/tinyshakespeare.txt}
export EXPORT STEPS BATCH SEQ TEXT GREEDY=${GREEDY:-} TOKENS=${TOKENS:-}
python3 - <<'PY'
import json, math, os, time
import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM

exp, steps, B, T = os.environ["EXPORT"], int(os.environ["STEPS"]), int(os.environ["BATCH"]), int(os.environ["SEQ"])
dev = "cuda" if torch.cuda.is_available() else "cpu"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {dev}")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# ---- (2) loom's export in transformers: greedy equals the trainer's
if os.environ.get("GREEDY"):
    want = json.load(open(os.environ["GREEDY"]))
    m = MixtralForCausalLM.from_pretrained(exp, dtype=torch.float32).to(dev).eval()
    ids = torch.tensor([want["prompt_ids"]], device=dev)
    got = []
    with torch.no_grad():  # plain argmax loop: no EOS stop or suppression, like loom's oracle
        for _ in want["greedy_ids"]:
            nxt = int(m(input_ids=ids).logits[0, -1].argmax())
            got.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]], device=dev)], dim=1)
    same = sum(a == b for a, b in zip(got, want["greedy_ids"]))
    print(f"export in transformers: greedy {same}/{len(got)} tokens equal to loom train's "
          f"({'AGREE' if got == want['greedy_ids'] else 'DIFFER'})")
    if got != want["greedy_ids"]:
        print("  transformers:", got)
        print("  loom train:  ", want["greedy_ids"])
    del m

# ---- (1) the same shape trained by transformers
if os.environ.get("TOKENS"):
    import array
    a = array.array("i")
    with open(os.environ["TOKENS"], "rb") as f:
        a.frombytes(f.read())
    data = torch.tensor(a, dtype=torch.long)
else:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(exp, "tokenizer.json"))
    data = torch.tensor(tok.encode(open(os.environ["TEXT"]).read(), add_special_tokens=False).ids)
n_train = len(data) - int(len(data) * 0.1)
train, val = data[:n_train], data[n_train:]
print(f"{len(data)} tokens, {n_train} train")
cfg = MixtralConfig.from_pretrained(exp)
cfg.output_router_logits = True
cfg.router_aux_loss_coef = 0.02
cfg.initializer_range = 0.02
torch.manual_seed(1)
model = MixtralForCausalLM(cfg).to(dev).float()
print(f"{sum(p.numel() for p in model.parameters())} parameters, rope_theta "
      f"{getattr(cfg, 'rope_theta', None) or cfg.rope_parameters}")
decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                         {"params": no_decay, "weight_decay": 0.0}],
                        lr=2e-3, betas=(0.9, 0.95), eps=1e-8)
def lr_at(s, warm=20, lr=2e-3, lo=2e-4):
    if s < warm:
        return lr * (s + 1) / warm
    p = (s - warm) / max(1, steps - warm)
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * min(1.0, p)))
g = torch.Generator().manual_seed(1)
def windows(src, n):
    i = torch.randint(0, len(src) - T - 1, (n,), generator=g)
    x = torch.stack([src[j:j + T + 1] for j in i.tolist()])
    return x[:, :-1].to(dev), x[:, 1:].to(dev)
vbatches = [windows(val, B) for _ in range(16)]
def val_loss():
    model.eval()
    with torch.no_grad():
        l = sum(torch.nn.functional.cross_entropy(model(input_ids=x).logits.flatten(0, 1),
                                                  y.flatten()).item() for x, y in vbatches)
    model.train()
    return l / len(vbatches)
model.train()
t0 = time.time()
curve = []
for s in range(steps):
    for grp in opt.param_groups:
        grp["lr"] = lr_at(s)
    x, y = windows(train, B)
    out = model(input_ids=x, labels=None)
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    loss = ce + cfg.router_aux_loss_coef * out.aux_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if (s + 1) % 20 == 0 or s + 1 == steps:
        v = val_loss()
        curve.append(((s + 1) * B * T, v))
        print(f"step {s:4d}  tokens {(s + 1) * B * T:8d}  train ce {ce.item():.4f}  val {v:.4f}",
              flush=True)
print(f"transformers MixtralForCausalLM, {steps} x {B} x {T} = {steps * B * T:,} tokens in "
      f"{time.time() - t0:.0f} s on {dev}: final val {curve[-1][1]:.4f}, best "
      f"{min(v for _, v in curve):.4f}")
print("validation loss by tokens seen: " + ", ".join(f"{t / 1e6:.2f}M {v:.3f}" for t, v in curve))
PY
