# Shared by tests/e2e/test_gateway_*.sh, on top of lib.sh: start `loom gateway` on a free
# loopback port, and wait for HTTP endpoints.
#   start_gateway NAME [loom gateway flags...]   -> sets NAME_URL, NAME_PID; log in $WORK/NAME.log
#   wait_status URL STATUS [SECONDS]             -> polls until GET URL answers STATUS
# LOOM_GATEWAY_BIN, when set,
# runs the gateway from another binary (a sanitizer build, say) than the instances.
GATEWAY_BIN=${LOOM_GATEWAY_BIN:-$LOOM_BIN}

require_gateway() {
    "$GATEWAY_BIN" gateway --help >/dev/null 2>&1 || die "'$GATEWAY_BIN gateway --help' failed"
}

start_gateway() {
    local name=$1
    shift
    "$GATEWAY_BIN" gateway --host 127.0.0.1 --port 0 "$@" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    E2E_PIDS+=("$pid")
    local url=""
    for _ in $(seq 100); do
        url=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$WORK/$name.log" 2>/dev/null | head -n1 |
              sed 's/^listening on //')
        [ -n "$url" ] && break
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "$name: loom gateway exited early"; }
        sleep 0.1
    done
    [ -n "$url" ] || { cat "$WORK/$name.log" >&2; die "$name: no 'listening on' line after 10 s"; }
    printf -v "${name}_URL" '%s' "$url"
    printf -v "${name}_PID" '%s' "$pid"
}

wait_status() {
    local url=$1 want=$2 secs=${3:-20} got=""
    for _ in $(seq $((secs * 10))); do
        got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null)
        [ "$got" = "$want" ] && return 0
        sleep 0.1
    done
    die "GET $url: status $got after $secs s, want $want"
}
