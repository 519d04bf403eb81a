#!/usr/bin/env bash
# Run examples/local.toml with its two back ends (Python's http.server on 18081 and 18082).
# Ctrl-C stops the gateway and both web servers.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m http.server 18081 --bind 127.0.0.1 >/dev/null 2>&1 & web1=$!
python3 -m http.server 18082 --bind 127.0.0.1 >/dev/null 2>&1 & web2=$!
trap 'kill $web1 $web2 2>/dev/null' EXIT
echo "web1 on 127.0.0.1:18081, web2 on 127.0.0.1:18082; the VIP: curl http://127.0.0.1:18443/" >&2
gateway run -c local.toml "$@"
