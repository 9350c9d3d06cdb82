# Shared by the e2e scripts: start `loom serve` on a free loopback port and always stop it.
#   source "$(dirname "$0")/lib.sh"
#   start_server NAME [loom serve flags...]   -> sets NAME_URL, NAME_PID; log in $WORK/NAME.log
# Servers are started with --port 0 (the kernel picks a free port, no race with other tests) and
# the address is read from the "listening on" line. Everything started is killed on exit.

: "${LOOM_BIN:?set LOOM_BIN to the loom binary}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/loom-e2e.XXXXXX")
E2E_PIDS=()

e2e_cleanup() {
    for pid in "${E2E_PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap e2e_cleanup EXIT

skip() {
    echo "SKIP: $*"
    exit 77
}

die() {
    echo "FAIL: $*" >&2
    exit 1
}

# start_server NAME flags...: waits up to 30 s for the listening line.
start_server() {
    local name=$1
    shift
    "$LOOM_BIN" serve --host 127.0.0.1 --port 0 "$@" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    E2E_PIDS+=("$pid")
    local url=""
    for _ in $(seq 300); do
        url=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$WORK/$name.log" 2>/dev/null | head -n1 |
              sed 's/^listening on //')
        [ -n "$url" ] && break
        kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "$name: loom serve exited early"; }
        sleep 0.1
    done
    [ -n "$url" ] || { cat "$WORK/$name.log" >&2; die "$name: no 'listening on' line after 30 s"; }
    printf -v "${name}_URL" '%s' "$url"
    printf -v "${name}_PID" '%s' "$pid"
}

# stop_server NAME SIGNAL: sends the signal and checks a clean exit (status 0) within 10 s.
stop_server() {
    local name=$1 sig=$2 pid_var="${1}_PID"
    local pid=${!pid_var}
    kill "-$sig" "$pid" || die "$name: cannot signal $pid"
    local rc=""
    for _ in $(seq 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            rc=$?
            break
        fi
        sleep 0.1
    done
    [ -n "$rc" ] || die "$name: still running 10 s after SIG$sig"
    [ "$rc" -eq 0 ] || { tail -n 20 "$WORK/$name.log" >&2; die "$name: exit status $rc after SIG$sig, want 0"; }
}
