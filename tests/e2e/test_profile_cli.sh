#!/usr/bin/env bash
# `loom profile`: the in-process CPU profile and the --url profile of a live `loom serve` each
# write a profile that `loom plan --profiles` uses; --host writes a catalog `loom plan` accepts;
# bad flags exit 2. Small grids on llama-tiny, so the whole test takes a few seconds.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
ROOT=$(cd "$HERE/../.." && pwd)
export LOOM_CATALOG=${LOOM_CATALOG:-$ROOT/data/devices.yaml}
GRID=(--max-batch 4 --max-context 128 --max-prompt 128 --repeat 1 --no-progress)
printf 'machines:\n  - {name: localhost, device: cpu, count: 2}\n' >"$WORK/cpu.yaml"
mkdir -p "$WORK/profiles"

# flags
for bad in "--backend cpu" "--model random:llama-tiny" "--model random:llama-tiny --backend cuda" \
    "--model random:llama-tiny --backend cpu --max-batch 0" "--host --url http://x" \
    "--model random:llama-tiny --backend cpu --device Z9000"; do
    # shellcheck disable=SC2086
    timeout 30 "$LOOM_BIN" profile $bad --out "$WORK/x.yaml" >/dev/null 2>"$WORK/err"
    rc=$?
    [ "$rc" -eq 2 ] || { cat "$WORK/err" >&2; die "'loom profile $bad': exit status $rc, want 2"; }
done
"$LOOM_BIN" profile --help | grep -q -- '--max-context' || die "--help does not document --max-context"

# in process
timeout 60 "$LOOM_BIN" profile --model random:llama-tiny --backend cpu --threads 1 "${GRID[@]}" \
    --out "$WORK/profiles/cpu-tp1.yaml" >"$WORK/p1.txt" 2>&1 || { cat "$WORK/p1.txt" >&2; die "in-process profile failed"; }
grep -q '^device: "cpu"' "$WORK/profiles/cpu-tp1.yaml" || die "profile names no device"
grep -q '^tp: 1' "$WORK/profiles/cpu-tp1.yaml" || die "profile has no tp 1"
grep -q 'rel_rms_error:' "$WORK/profiles/cpu-tp1.yaml" || die "profile has no fit error"
grep -q 'relative RMS error' "$WORK/p1.txt" || die "no fit summary printed"
"$LOOM_BIN" plan --cluster "$WORK/cpu.yaml" --model random:llama-tiny --tp 1 \
    --profiles "$WORK/profiles" --no-output >"$WORK/plan.txt" 2>&1 || { cat "$WORK/plan.txt" >&2; die "plan with the profile failed"; }
grep -q 'profile' "$WORK/plan.txt" || die "the plan did not use the profile"

# --refit: the kept steps fitted again give the same coefficients, without measuring
grep -q '^steps:' "$WORK/profiles/cpu-tp1.yaml" || die "profile keeps no steps: list"
timeout 30 "$LOOM_BIN" profile --refit "$WORK/profiles/cpu-tp1.yaml" --model random:llama-tiny \
    --quiet >"$WORK/refit.yaml" 2>"$WORK/refit.err" || { cat "$WORK/refit.err" >&2; die "--refit failed"; }
diff <(grep '^coefficients:' "$WORK/profiles/cpu-tp1.yaml") <(grep '^coefficients:' "$WORK/refit.yaml") ||
    die "--refit of an unchanged model gave other coefficients"
grep -q '^device: "cpu"' "$WORK/refit.yaml" && grep -q '^tp: 1' "$WORK/refit.yaml" ||
    die "--refit lost the device or tp"
grep -v '^steps:\|^  - {' "$WORK/profiles/cpu-tp1.yaml" | grep -v '^# the timed steps' >"$WORK/nosteps.yaml"
timeout 30 "$LOOM_BIN" profile --refit "$WORK/nosteps.yaml" --model random:llama-tiny >/dev/null 2>"$WORK/err"
[ $? -eq 2 ] && grep -q 'keeps no timed steps' "$WORK/err" || die "--refit of a profile without steps: want exit 2 and a message"
timeout 30 "$LOOM_BIN" profile --refit "$WORK/profiles/cpu-tp1.yaml" --model random:llama-tiny --tp 2 >/dev/null 2>&1
[ $? -eq 2 ] || die "--refit with --tp: want exit 2"

# over HTTP
start_server S --model random:llama-tiny --threads 1 --max-num-seqs 8
timeout 60 "$LOOM_BIN" profile --url "$S_URL" --model random:llama-tiny --device cpu --tp 1 \
    "${GRID[@]}" --model-name tiny-http --out "$WORK/http.yaml" >"$WORK/p2.txt" 2>&1 ||
    { cat "$WORK/p2.txt" >&2; die "--url profile failed"; }
grep -q '^model: "tiny-http"' "$WORK/http.yaml" || die "--url profile lacks the model name"
stop_server S TERM

# host
timeout 60 "$LOOM_BIN" profile --host --out "$WORK/host.yaml" 2>/dev/null || die "--host failed"
grep -q 'pooled: true' "$WORK/host.yaml" || die "--host catalog has no pooled cpu"
"$LOOM_BIN" plan --cluster "$WORK/cpu.yaml" --model random:llama-tiny --catalog "$WORK/host.yaml" \
    --no-output --quiet || die "plan rejects the --host catalog"
echo "PASS test_profile_cli"
