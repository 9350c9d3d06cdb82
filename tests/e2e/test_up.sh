#!/usr/bin/env bash
# `loom up plan.yaml`: a plan with two local emulated instances (an H100 and a T4, serving
# random:llama-tiny) becomes one endpoint; completions are answered through it by both
# instances; an instance killed with SIGKILL is restarted by loom up, re-admitted by the gateway
# and serves again; SIGTERM stops the gateway and every `loom serve` child (exit 0, no process
# left).
# Loopback only; under 30 s.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
command -v curl >/dev/null || skip "curl is not installed"
UP_BIN=$LOOM_BIN
REPO=$(cd "$HERE/../.." && pwd)
export LOOM_CATALOG=${LOOM_CATALOG:-$REPO/data/devices.yaml}

printf 'machines:\n  - {name: fast, device: H100-80G, count: 1, host: 127.0.0.1}\n  - {name: slow, device: T4, count: 1, host: localhost}\n' >"$WORK/cluster.yaml"
"$UP_BIN" plan --cluster "$WORK/cluster.yaml" --model random:llama-tiny --output "$WORK/plan.yaml" \
    --quiet >"$WORK/plan.log" 2>&1 || die "loom plan: $(cat "$WORK/plan.log")"

# --dry-run: both instances local, emulated, nothing started
"$UP_BIN" up "$WORK/plan.yaml" --dry-run --port 0 >"$WORK/dry.log" 2>&1 || die "dry run: $(cat "$WORK/dry.log")"
[ "$(grep -c 'local: loom serve .*--backend emulated' "$WORK/dry.log")" = 2 ] ||
    die "dry run: want two local emulated instances: $(cat "$WORK/dry.log")"

"$UP_BIN" up "$WORK/plan.yaml" --port 0 --max-kv-blocks 2048 --log-dir "$WORK/logs" \
    --stop-timeout 5 >"$WORK/up.log" 2>&1 &
UP_PID=$!
E2E_PIDS+=("$UP_PID")
url=""
for _ in $(seq 200); do
    url=$(grep -o 'endpoint http://[0-9.]*:[0-9]*' "$WORK/up.log" | sed 's/^endpoint //')
    [ -n "$url" ] && break
    kill -0 "$UP_PID" 2>/dev/null || die "loom up exited early: $(cat "$WORK/up.log")"
    sleep 0.1
done
[ -n "$url" ] || die "no endpoint line after 20 s: $(cat "$WORK/up.log")"
CHILDREN=$(ps -o pid= --ppid "$UP_PID" | tr -d ' ')
[ "$(echo "$CHILDREN" | wc -w)" = 2 ] || die "want 2 child processes of loom up, got: $CHILDREN"
E2E_PIDS+=($CHILDREN)

: >"$WORK/instances"
for i in $(seq 12); do
    code=$(curl -s -D "$WORK/h" -o "$WORK/body" -w '%{http_code}' --max-time 10 \
        "$url/v1/completions" -H 'Content-Type: application/json' \
        -d '{"model": "random:llama-tiny", "prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 64, "ignore_eos": true}') &
    sleep 0.02
done
wait_children() { for p in $(jobs -p); do [ "$p" = "$UP_PID" ] || wait "$p"; done; }
# sequential checks on a second pass (the parallel pass above only loads the instances)
wait_children
for i in $(seq 6); do
    code=$(curl -s -D "$WORK/h" -o "$WORK/body" -w '%{http_code}' --max-time 10 \
        "$url/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt": [1, 2, 3], "max_tokens": 4}')
    [ "$code" = 200 ] || die "completion $i: status $code: $(cat "$WORK/body")"
    grep -q '"completion_tokens":4' "$WORK/body" || die "completion $i: $(cat "$WORK/body")"
    grep -i '^x-loom-instance:' "$WORK/h" | tr -d '\r' | awk '{print $2}' >>"$WORK/instances"
done
# (at this load capacity_aware may send everything to the H100: a request finishes sooner
# there even beside a dozen others; the T4 serves below, while the H100 is dead)
curl -s "$url/admin/upstreams" >"$WORK/ups.json"
served=$(grep -o '"requests":[0-9]*' "$WORK/ups.json" | awk -F: '$2 > 0' | wc -l)
[ "$served" -ge 1 ] || die "no instance served requests: $(cat "$WORK/ups.json")"

# an instance that dies is started again on its port and re-admitted by the gateway: kill the
# fast one (instance 0; an idle capacity_aware gateway sends every request there once it is back)
FAST_URL=$(grep -o '^  \[0\] .* at [0-9.]*:[0-9]*' "$WORK/up.log" | grep -o '[0-9.]*:[0-9]*$')
[ -n "$FAST_URL" ] || die "no address for instance 0 in: $(cat "$WORK/up.log")"
FAST_URL="http://$FAST_URL"
FAST_PID=$(pgrep -P "$UP_PID" -f -- "--port ${FAST_URL##*:}\$")
[ -n "$FAST_PID" ] || die "no child of loom up listens on $FAST_URL: $(ps -o pid=,args= --ppid "$UP_PID")"
kill -KILL "$FAST_PID"
# requests meanwhile are answered (retried on the other instance), and eject the dead one
for _ in $(seq 100); do
    grep -q 'instance 0 restarted' "$WORK/up.log" && break
    code=$(curl -s -o "$WORK/body" -w '%{http_code}' --max-time 10 "$url/v1/completions" \
        -H 'Content-Type: application/json' -d '{"prompt": [1, 2, 3], "max_tokens": 4}')
    [ "$code" = 200 ] || die "completion while instance 0 is dead: status $code: $(cat "$WORK/body")"
    sleep 0.1
done
grep -q 'instance 0 (port [0-9]*) killed by signal 9; restarting it' "$WORK/up.log" ||
    die "no death logged: $(tail -5 "$WORK/up.log")"
grep -q 'instance 0 restarted' "$WORK/up.log" || die "instance 0 not restarted in 10 s: $(tail -5 "$WORK/up.log")"
NEW_PID=$(pgrep -P "$UP_PID" -f -- "--port ${FAST_URL##*:}\$")
[ -n "$NEW_PID" ] && [ "$NEW_PID" != "$FAST_PID" ] || die "no new child on $FAST_URL"
E2E_PIDS+=("$NEW_PID")
back=""
for _ in $(seq 100); do
    code=$(curl -s -D "$WORK/h" -o "$WORK/body" -w '%{http_code}' --max-time 10 \
        "$url/v1/completions" -H 'Content-Type: application/json' \
        -d '{"prompt": [1, 2, 3], "max_tokens": 4}')
    [ "$code" = 200 ] || die "completion while instance 0 restarts: status $code: $(cat "$WORK/body")"
    if grep -qi "^x-loom-instance: $FAST_URL" "$WORK/h"; then
        back=1
        break
    fi
    sleep 0.2
done
[ -n "$back" ] || die "restarted instance 0 never served through the gateway: $(curl -s "$url/admin/upstreams")"
grep -q "upstream $FAST_URL re-admitted" "$WORK/up.log" || die "no re-admission logged: $(tail -5 "$WORK/up.log")"
CHILDREN=$(ps -o pid= --ppid "$UP_PID" | tr -d ' ')
[ "$(echo "$CHILDREN" | wc -w)" = 2 ] || die "want 2 child processes after the restart, got: $CHILDREN"
curl -s "$url/admin/upstreams" >"$WORK/ups.json"
served=$(grep -o '"requests":[0-9]*' "$WORK/ups.json" | awk -F: '$2 > 0' | wc -l)
[ "$served" = 2 ] || die "want both instances to have served requests: $(cat "$WORK/ups.json")"

kill -TERM "$UP_PID"
rc=""
for _ in $(seq 150); do
    if ! kill -0 "$UP_PID" 2>/dev/null; then
        wait "$UP_PID"
        rc=$?
        break
    fi
    sleep 0.1
done
[ -n "$rc" ] || die "loom up still running 15 s after SIGTERM"
[ "$rc" = 0 ] || die "loom up exited with $rc after SIGTERM: $(tail -5 "$WORK/up.log")"
for p in $CHILDREN; do
    if [ -e "/proc/$p" ] && [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ]; then
        die "instance pid $p still running after loom up stopped"
    fi
done
grep -q 'loom up: stopped' "$WORK/up.log" || die "no 'stopped' line: $(tail -5 "$WORK/up.log")"
echo "PASS"
