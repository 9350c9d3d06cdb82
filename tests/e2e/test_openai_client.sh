#!/usr/bin/env bash
# The official `openai` npm client completes a chat request, a streamed chat request and a
# completion against `loom serve`. The package is installed once into tests/e2e/node_modules
# (git-ignored); without a reachable npm registry the test is skipped.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/lib.sh"
command -v node >/dev/null || skip "node is not installed"
if [ ! -f "$HERE/node_modules/openai/package.json" ]; then
    command -v npm >/dev/null || skip "npm is not installed (needed to fetch the openai client)"
    if ! timeout 120 npm install --prefix "$HERE" --no-save --no-package-lock --no-audit --no-fund \
        --fetch-timeout=30000 --fetch-retries=1 openai >"$WORK/npm.log" 2>&1; then
        tail -n 5 "$WORK/npm.log"
        skip "npm could not install the openai package (is the registry reachable?)"
    fi
fi
echo "openai $(node -p "require('$HERE/node_modules/openai/package.json').version")"

KEY=sk-loom-e2e
start_server S --model random:llama-tiny --num-kv-blocks 256 --threads 1 --api-key "$KEY"
# wait for /health, then run the client
node -e '
(async () => {
  for (let i = 0; i < 200; i++) {
    try { if ((await fetch(process.argv[1] + "/health")).status === 200) return; } catch (e) {}
    await new Promise((r) => setTimeout(r, 50));
  }
  process.exit(1);
})();' "$S_URL" || die "server not healthy"
timeout 60 node "$HERE/openai_client.cjs" "$S_URL" "$KEY" || { tail -n 20 "$WORK/S.log" >&2; die "openai client"; }
stop_server S TERM
