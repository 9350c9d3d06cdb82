# Shared by the bench/ scripts that start servers (sourced; the caller defines die).
#   wait_line LOG PID [SECONDS]  -> prints the http://host:port of LOG's "listening on" line;
#                                   dies when PID exits first or after SECONDS (60)
wait_line() {
    local url="" tries=$((${3:-60} * 10))
    for _ in $(seq "$tries"); do
        url=$(grep -o 'listening on http://[0-9.]*:[0-9]*' "$1" 2>/dev/null | head -n1 | sed 's/^listening on //')
        [ -n "$url" ] && { echo "$url"; return 0; }
        kill -0 "$2" 2>/dev/null || die "$(basename "$1" .log) exited: $(tail -3 "$1")"
        sleep 0.1
    done
    die "$(basename "$1" .log): no 'listening on' line after ${3:-60} s"
}
