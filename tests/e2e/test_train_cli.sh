#!/usr/bin/env bash
# loom train's command line: --help, flag values it refuses (exit 2, the flag named), and
# --router-jitter (Switch gate-input jitter): it changes the losses, a run saved and resumed
# with it continues bitwise (the jitter generator travels in the checkpoint), and the hash
# router, which has no gate, refuses it. A few seconds on 2 cores. Skips (77) without
# ../shared (the tokenizer and text).
set -u
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
source "$(dirname "$0")/lib.sh"
SHARED=${LOOM_SHARED:-../shared}
TOK="$SHARED/models/shakespeare-moe"
[ -r "$TOK/tokenizer.json" ] || skip "$TOK is absent (set LOOM_SHARED)"

"$LOOM_BIN" train --help >"$WORK/help.txt" || die "--help did not exit 0"
grep -q -- "--router-jitter" "$WORK/help.txt" || die "--help does not list --router-jitter"

# expect NAME CODE TEXT ARGS...: loom train ARGS exits CODE and says TEXT on stderr
expect() {
    local name=$1 code=$2 text=$3
    shift 3
    "$LOOM_BIN" train "$@" >/dev/null 2>"$WORK/err"
    local rc=$?
    [ "$rc" = "$code" ] || { cat "$WORK/err"; die "$name: exit $rc, wanted $code"; }
    grep -qF -- "$text" "$WORK/err" || { cat "$WORK/err"; die "$name: no '$text' on stderr"; }
}

head -c 40000 "$SHARED/data/tinyshakespeare.txt" >"$WORK/text.txt"
COMMON=(--model-preset mixtral-tiny --data "$WORK/text.txt" --tokenizer "$TOK" --batch 4
        --seq-len 32 --steps 5 --warmup 10 --log-every 1 --val-every 0 --quiet --threads 2)
# (the first half of the resume check ends inside the warmup, so its --steps 2 sees the
# learning rates of the 5-step run)

expect "jitter out of range" 2 "invalid value '1.5' for --router-jitter" "${COMMON[@]}" --router-jitter 1.5
expect "negative jitter" 2 "invalid value '-0.1' for --router-jitter" "${COMMON[@]}" --router-jitter=-0.1
expect "bad learning rate" 2 "invalid value 'fast' for --lr" "${COMMON[@]}" --lr fast
expect "hash with jitter" 2 "the hash router has no gate to jitter" "${COMMON[@]}" --router hash \
    --router-jitter 0.1

# losses of a run, one line per step: "step loss ce"
losses() { grep '^step' "$1" | awk '{print $2, $4, $6}'; }
"$LOOM_BIN" train "${COMMON[@]}" 2>"$WORK/plain.err" || { cat "$WORK/plain.err"; die "plain run failed"; }
"$LOOM_BIN" train "${COMMON[@]}" --router-jitter 0.2 2>"$WORK/jit.err" ||
    { cat "$WORK/jit.err"; die "jittered run failed"; }
losses "$WORK/plain.err" >"$WORK/plain.txt"
losses "$WORK/jit.err" >"$WORK/jit.txt"
[ "$(wc -l <"$WORK/jit.txt")" = 5 ] || { cat "$WORK/jit.err"; die "the jittered run logged no 5 steps"; }
# step 0 routes before any update: the jitter alone changes it
! cmp -s <(head -1 "$WORK/plain.txt") <(head -1 "$WORK/jit.txt") ||
    die "--router-jitter 0.2 left step 0's loss unchanged: $(head -1 "$WORK/jit.txt")"

# save after 2 steps, resume to 5: steps 2..4 as in the uninterrupted run
"$LOOM_BIN" train "${COMMON[@]}" --router-jitter 0.2 --steps 2 --save "$WORK/ck.bin" \
    2>"$WORK/first.err" || { cat "$WORK/first.err"; die "first half failed"; }
"$LOOM_BIN" train "${COMMON[@]}" --router-jitter 0.2 --resume "$WORK/ck.bin" 2>"$WORK/second.err" ||
    { cat "$WORK/second.err"; die "resumed half failed"; }
losses "$WORK/second.err" >"$WORK/second.txt"
tail -n 3 "$WORK/jit.txt" >"$WORK/want.txt"
cmp -s "$WORK/second.txt" "$WORK/want.txt" ||
    { paste "$WORK/second.txt" "$WORK/want.txt"; die "the resumed jittered run differs"; }
echo "train cli: bad values refused with exit 2; jitter changes step 0 and resumes bitwise"
