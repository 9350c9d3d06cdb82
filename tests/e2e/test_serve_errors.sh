#!/usr/bin/env bash
# `loom serve` refuses what it cannot serve with one clear line and the right exit status, and
# never crashes: corrupt, truncated and missing checkpoints, an unsupported architecture, a bad
# tokenizer (exit 2); bad flags (exit 2); a port in use (exit 1). A clean copy of the fixture
# serves, so the failures are the corruptions' doing.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
SHARED=${LOOM_SHARED:-$HERE/../../../shared}
FIXTURE=$SHARED/fixtures/tiny-llama
[ -d "$FIXTURE" ] || skip "$FIXTURE is absent (set LOOM_SHARED); the checkpoint tests need it"
failures=0

# expect_exit WANT_RC NAME flags...: runs loom serve, which must exit by itself with WANT_RC and
# print exactly one stderr line (two for usage errors: the problem and the --help hint). Progress
# logs ("loom info: loaded ...") of the steps that did succeed are not counted.
expect_exit() {
    local want=$1 name=$2
    shift 2
    timeout 30 "$LOOM_BIN" serve --port 0 "$@" >"$WORK/out" 2>"$WORK/err"
    local rc=$?
    local lines
    grep -v '^loom \(info\|debug\): ' "$WORK/err" >"$WORK/err.lines"
    lines=$(wc -l <"$WORK/err.lines")
    local first
    first=$(head -n1 "$WORK/err.lines")
    if [ "$rc" -ne "$want" ]; then
        echo "FAIL $name: exit status $rc, want $want (124 = hung, >128 = killed by a signal)"
        sed 's/^/    stderr: /' "$WORK/err" | head -n 5
        failures=$((failures + 1))
        return 1
    fi
    if [ "$want" -ne 2 ] || ! grep -q "^Run 'loom serve --help'" "$WORK/err"; then
        if [ "$lines" -ne 1 ]; then
            echo "FAIL $name: $lines lines on stderr, want one"
            sed 's/^/    stderr: /' "$WORK/err" | head -n 5
            failures=$((failures + 1))
            return 1
        fi
    fi
    if grep -qi 'sanitizer\|segmentation\|core dumped\|assert' "$WORK/err"; then
        echo "FAIL $name: crash report on stderr: $first"
        failures=$((failures + 1))
        return 1
    fi
    echo "ok   $name: rc=$rc: $first"
    LAST_ERR=$first
    return 0
}

expect_message() { # NAME REGEX: the last error line must match
    if ! printf '%s\n' "$LAST_ERR" | grep -qiE "$2"; then
        echo "FAIL $1: message does not match /$2/: $LAST_ERR"
        failures=$((failures + 1))
    fi
}

fresh() { # a writable copy of the fixture
    local d=$WORK/$1
    rm -rf "$d"
    cp -r "$FIXTURE" "$d"
    chmod -R u+w "$d"
    echo "$d"
}

# --- the clean copy serves (real tokenizer and chat template)
d=$(fresh good)
start_server GOOD --model "$d" --num-kv-blocks 64 --threads 1
node -e '
const base = process.argv[1];
(async () => {
  for (let i = 0; i < 100; i++) {
    try { if ((await fetch(base + "/health")).status === 200) break; } catch (e) {}
    await new Promise((r) => setTimeout(r, 50));
  }
  const r = await fetch(base + "/v1/chat/completions", { method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ messages: [{ role: "user", content: "Hello there" }], max_tokens: 4 }) });
  const j = await r.json();
  if (r.status !== 200 || j.object !== "chat.completion" || !(j.usage.prompt_tokens > 0))
    { console.error("fixture chat:", r.status, JSON.stringify(j)); process.exit(1); }
  console.log("ok   fixture serves a chat request:", JSON.stringify(j.choices[0].message.content));
})().catch((e) => { console.error(e); process.exit(1); });
' "$GOOD_URL" || { failures=$((failures + 1)); echo "FAIL the clean fixture does not serve"; }

# --- a port in use: exit 1, saying so
port=${GOOD_URL##*:}
if expect_exit 1 "port in use" --model "$d" --port "$port" --num-kv-blocks 8; then
    expect_message "port in use" "in use|$port"
fi
stop_server GOOD TERM

# --- checkpoints that cannot be loaded: exit 2
st_size=$(stat -c %s "$FIXTURE/model.safetensors")

d=$(fresh truncated)
truncate -s $((st_size / 2)) "$d/model.safetensors"
expect_exit 2 "truncated to half" --model "$d"

d=$(fresh truncated-tail)
truncate -s $((st_size - 1)) "$d/model.safetensors"
expect_exit 2 "one byte short" --model "$d"

d=$(fresh truncated-header)
truncate -s 100 "$d/model.safetensors"
expect_exit 2 "cut inside the header" --model "$d"

d=$(fresh empty)
: >"$d/model.safetensors"
expect_exit 2 "empty file" --model "$d"

d=$(fresh huge-header-len)
printf '\xff\xff\xff\xff\xff\xff\xff\x7f' | dd of="$d/model.safetensors" bs=1 conv=notrunc status=none
expect_exit 2 "header length past the end" --model "$d"

d=$(fresh garbage-header)
head -c 64 /dev/zero | tr '\0' '#' | dd of="$d/model.safetensors" bs=1 seek=8 conv=notrunc status=none
expect_exit 2 "garbage header JSON" --model "$d"

d=$(fresh random-bytes)
head -c 4096 /dev/urandom | dd of="$d/model.safetensors" bs=1 conv=notrunc status=none
expect_exit 2 "random bytes over the start" --model "$d"

d=$(fresh missing-weights)
rm "$d/model.safetensors"
expect_exit 2 "no safetensors file" --model "$d"

d=$(fresh arch)
sed -i 's/LlamaForCausalLM/FooBarForCausalLM/' "$d/config.json"
if expect_exit 2 "unsupported architecture" --model "$d"; then
    expect_message "unsupported architecture" "FooBarForCausalLM"
fi

d=$(fresh bad-config)
echo '{"architectures": ["LlamaForCausalLM"], "hidden_size": ' >"$d/config.json"
expect_exit 2 "config.json is not JSON" --model "$d"

d=$(fresh bad-tokenizer)
echo '{"model": {"type": "BPE", "vocab": 5' >"$d/tokenizer.json"
expect_exit 2 "tokenizer.json is not JSON" --model "$d"

expect_exit 2 "no such directory" --model "$WORK/does-not-exist"
expect_exit 2 "unknown preset" --model random:no-such-preset

# --- bad flags: exit 2
expect_exit 2 "unknown flag" --model random:llama-tiny --frobnicate
expect_exit 2 "port not a number" --model random:llama-tiny --port eighty
expect_exit 2 "port out of range" --model random:llama-tiny --port 70000
expect_exit 2 "missing --model"
expect_exit 2 "flag without its value" --model
expect_exit 2 "both KV sizes" --model random:llama-tiny --num-kv-blocks 8 --kv-cache-memory 1GiB
expect_exit 2 "bad byte size" --model random:llama-tiny --kv-cache-memory lots
expect_exit 2 "KV memory below one block" --model random:llama-tiny --kv-cache-memory 1
expect_exit 2 "unknown backend" --model random:llama-tiny --backend tpu
expect_exit 2 "stray argument" --model random:llama-tiny extra
expect_exit 2 "max-model-len over the model's" --model random:llama-tiny --max-model-len 100000
expect_exit 2 "max-model-len over the KV cache" --model random:llama-tiny --num-kv-blocks 4 \
    --max-model-len 1000

# --- help documents every flag
"$LOOM_BIN" serve --help >"$WORK/help" || { echo "FAIL serve --help exit status"; failures=$((failures + 1)); }
for flag in --model --host --port --served-model-name --threads --block-size --num-kv-blocks \
    --kv-cache-memory --max-num-seqs --max-num-batched-tokens --max-model-len --max-waiting \
    --enable-prefix-caching --no-enable-prefix-caching --api-key --max-body-bytes --seed --backend; do
    grep -q -- "$flag" "$WORK/help" || { echo "FAIL serve --help does not document $flag"; failures=$((failures + 1)); }
done
grep -q 'BF16' "$WORK/help" || { echo "FAIL serve --help does not say BF16 weights are widened"; failures=$((failures + 1)); }
"$LOOM_BIN" --help | grep -q serve || { echo "FAIL loom --help does not list serve"; failures=$((failures + 1)); }
"$LOOM_BIN" no-such-command 2>/dev/null
[ $? -eq 2 ] || { echo "FAIL unknown command: exit status, want 2"; failures=$((failures + 1)); }

[ "$failures" -eq 0 ] || die "$failures checks failed"
echo "PASS"
