#!/usr/bin/env bash
# Faults behind `loom gateway` (see gateway_client.mjs, phases burst and served):
#  - one of three instances is killed (SIGKILL) during a burst of 200 requests: every request
#    gets exactly one answer (non-streaming ones retried on the others; streams already
#    started end with an error event and [DONE]), none hangs; the dead instance is ejected,
#    and re-admitted once it is back on its port;
#  - garbage bodies, a client that sends its headers slowly, one that never reads its stream
#    and one that vanishes get errors or are dropped, while a burst beside them succeeds.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
source "$HERE/gateway_lib.sh"
command -v node >/dev/null || skip "node is not installed (the test client is a Node script)"
command -v curl >/dev/null || skip "curl is not installed"
command -v python3 >/dev/null || skip "python3 is not installed"
require_gateway

for n in A B C; do
    start_server "$n" --model random:llama-tiny --num-kv-blocks 512 --threads 1
done
start_gateway G --policy capacity_aware --upstream "$A_URL" --upstream "$B_URL" \
    --upstream "$C_URL" --health-interval 0.2 --health-timeout 1 --scrape-interval 0.5 \
    --retries 2 --max-client-buffer 64KiB
echo "instances $A_URL $B_URL $C_URL, gateway $G_URL"
wait_status "$G_URL/v1/models" 200

upstream_state() { # URL -> "true"/"false": is it healthy in the gateway's eyes
    curl -s "$G_URL/admin/upstreams" | node -e '
        let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
            const u = JSON.parse(s).upstreams.find((x) => x.url === process.argv[1]);
            console.log(u ? String(u.healthy) : "missing"); });' "$1"
}

# --- kill one of three during a burst
timeout 60 node "$HERE/gateway_client.mjs" burst "$G_URL" 200 "$WORK/burst.json" >"$WORK/burst.log" 2>&1 &
BURST=$!
sleep 0.7
kill -KILL "$C_PID"
echo "killed C during the burst"
wait "$BURST"
rc=$?
cat "$WORK/burst.log"
[ $rc -eq 0 ] || { tail -n 20 "$WORK/G.log" >&2; die "burst with a dead instance"; }
grep -q '"ok":' "$WORK/burst.json" || die "no burst summary"
for _ in $(seq 50); do [ "$(upstream_state "$C_URL")" = false ] && break; sleep 0.1; done
[ "$(upstream_state "$C_URL")" = false ] || die "the dead instance was not ejected"
echo "C ejected"

# --- C comes back on its port: re-admitted, then served again
C_PORT=${C_URL##*:}
"$LOOM_BIN" serve --host 127.0.0.1 --port "$C_PORT" --model random:llama-tiny --num-kv-blocks 512 \
    --threads 1 >"$WORK/C2.log" 2>&1 &
E2E_PIDS+=("$!")
for _ in $(seq 150); do [ "$(upstream_state "$C_URL")" = true ] && break; sleep 0.1; done
[ "$(upstream_state "$C_URL")" = true ] || { cat "$WORK/C2.log" >&2; die "C was not re-admitted"; }
echo "C re-admitted"
timeout 30 node "$HERE/gateway_client.mjs" served "$G_URL" "$C_URL" 24 || die "C serves again"

# --- hostile clients beside a normal burst
python3 - "$G_URL" >"$WORK/hostile.log" 2>&1 <<'PY' &
import socket, sys, time, json
host, port = sys.argv[1].split("//")[1].split(":")
port = int(port)
def conn(rcvbuf=None):
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, port))
    return s
# slow sender: half the headers, then nothing
slow = conn()
slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
# non-reader: a long stream it never reads
body = json.dumps({"prompt": "never read", "max_tokens": 1800, "ignore_eos": True, "stream": True}).encode()
nr = conn(rcvbuf=4096)
nr.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(body) + body)
# a body that lies about its length, then the client vanishes
liar = conn()
liar.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"messages\":")
liar.close()
# garbage request line
g = conn()
g.sendall(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
reply = g.recv(200)
g.close()
print("garbage request line ->", reply[:40])
time.sleep(8)
print("hostile clients done")
PY
HOSTILE=$!
sleep 0.3
timeout 60 node "$HERE/gateway_client.mjs" burst "$G_URL" 60 || die "a burst beside hostile clients"
wait "$HOSTILE"
cat "$WORK/hostile.log"
grep -q 'dropping a client' "$WORK/G.log" || die "the non-reading client was not dropped"
wait_status "$G_URL/health" 200 5
stop_server G TERM
echo "PASS"
