#!/usr/bin/env bash
# Runs every test: unit and model test binaries, end-to-end scripts, and each fuzz target over
# its seed corpus plus a short time-bounded fuzzing run. Exit code 77 from a test means "skipped"
# (for example ../shared is absent). The last line is "N passed, N failed, N skipped".
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
export LOOM_BIN="$PWD/$BUILD/loom"
export LOOM_SHARED="${LOOM_SHARED:-$PWD/../shared}"
FUZZ_SECONDS=${FUZZ_SECONDS:-10}
LOGDIR=$(mktemp -d /tmp/loom-tests.XXXXXX)
pass=0; fail=0; skip=0; failed=()

run_one() { # name, command...
    local name=$1; shift
    local log="$LOGDIR/$(echo "$name" | tr '/' '_').log"
    local t0=$(date +%s.%N)
    "$@" >"$log" 2>&1
    local rc=$?
    local dt=$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")
    if [ $rc -eq 0 ]; then
        pass=$((pass + 1)); printf '  PASS  %-44s %6ss\n' "$name" "$dt"
    elif [ $rc -eq 77 ]; then
        skip=$((skip + 1)); printf '  SKIP  %-44s %s\n' "$name" "$(grep -m1 -i 'skip' "$log" | cut -c1-80)"
    else
        fail=$((fail + 1)); failed+=("$name")
        printf '  FAIL  %-44s %6ss (rc=%d)\n' "$name" "$dt" "$rc"
        tail -n 30 "$log" | sed 's/^/        | /'
    fi
}

echo "== unit and model tests"
for t in $(find "$BUILD/tests" -type f -executable 2>/dev/null | sort); do
    run_one "${t#$BUILD/tests/}" "$t"
done
echo "== end-to-end tests"
for t in $(find tests/e2e -name 'test_*.sh' 2>/dev/null | sort); do
    run_one "${t#tests/}" bash "$t"
done
echo "== fuzz targets (seed corpus + ${FUZZ_SECONDS}s)"
for f in $(find "$BUILD/fuzz" -type f -executable -name 'fuzz_*' 2>/dev/null | sort); do
    name=$(basename "$f")
    corpus="tests/fuzz/corpus/${name#fuzz_}"
    work=$(mktemp -d /tmp/loom-fuzz.XXXXXX)
    [ -d "$corpus" ] && cp -r "$corpus"/. "$work"/ 2>/dev/null
    if "$f" -help=1 >/dev/null 2>&1; then   # libFuzzer
        run_one "fuzz/$name" "$f" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
            -print_final_stats=1 "$work"
    else
        run_one "fuzz/$name" "$f" "$work"
    fi
    rm -rf "$work"
done
rm -rf "$LOGDIR"
[ ${#failed[@]} -gt 0 ] && echo "failed: ${failed[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[ $fail -eq 0 ]
