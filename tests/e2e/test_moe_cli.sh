#!/usr/bin/env bash
# `loom moe`: the capacity bound's figures (LocMoE, n = 16, delta = 0.03, d = 5120), bad input
# exits 2, and `analyze` over shakespeare-moe re-routes with every router, LocMoE's GrAP gate
# (which reads the MoE layers' input hidden states) included.
set -u
source "$(dirname "$0")/lib.sh"

out=$("$LOOM_BIN" moe bound --d 5120 --experts 16 --delta 0.03) || die "moe bound failed"
echo "$out" | grep -q "ec_min exact: .*1.965 tokens" || die "unexpected bound: $out"
"$LOOM_BIN" moe bound --d 1 --experts 16 --delta 0.03 >/dev/null 2>&1
[ $? -eq 2 ] || die "moe bound --d 1 should exit 2"
"$LOOM_BIN" moe nonsense >/dev/null 2>&1
[ $? -eq 2 ] || die "an unknown moe subcommand should exit 2"

SHARED=${LOOM_SHARED:-../shared}
MODEL="$SHARED/models/shakespeare-moe"
[ -r "$MODEL/config.json" ] || skip "$MODEL is absent (set LOOM_SHARED)"
out=$("$LOOM_BIN" moe analyze --model "$MODEL" --text "$SHARED/data/tinyshakespeare.txt" \
      --max-tokens 512 2>/dev/null) || die "moe analyze failed"
for router in "model top-k" "switch top-1" "group-limited" "expert choice" "hash" "locmoe"; do
    line=$(echo "$out" | grep "^| $router") || die "no row for $router in: $out"
    # nine numeric columns after the name
    n=$(echo "$line" | awk -F'|' '{c=0; for (i=3;i<=11;i++) if ($i ~ /^ *[0-9.]+ *$/) c++; print c}')
    [ "$n" -eq 9 ] || die "row for $router is not numeric: $line"
done
# expert choice is balanced by construction
echo "$out" | grep "^| expert choice" | grep -q "| 1.00 | 0.000 | 0.00 |" ||
    die "expert choice should be perfectly balanced: $out"
"$LOOM_BIN" moe analyze --model "$WORK/missing" --text "$SHARED/data/tinyshakespeare.txt" \
    >/dev/null 2>&1
[ $? -eq 2 ] || die "a missing model should exit 2"
echo "PASS"
