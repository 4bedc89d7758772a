#!/usr/bin/env bash
# End-to-end overhead bench in one command: direct vs chutes-proxy vs nginx, same run, same
# concurrencies (1, 16, 64) and payloads (small JSON, 50-event SSE), open loop at a fixed
# rate plus a closed-loop throughput run. Prints a Markdown table (see BENCHMARKS.md).
#
# Installs nginx from Debian's packages if it is missing and we are root (the comparison is
# the point of the bench); otherwise the nginx rows are skipped with a message. Everything
# listens on 127.0.0.1 only. Knobs are env vars documented at the top of benches/e2e.rs
# (E2E_SECS, E2E_CLOSED_SECS, E2E_RATE, E2E_CONNS, E2E_PROXY_LOG, E2E_NGINX=0).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${E2E_NGINX:-1}" != "0" ]] && ! command -v nginx >/dev/null 2>&1 \
    && [[ ! -x /usr/sbin/nginx ]]; then
    if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null 2>&1; then
        echo "bench-e2e: installing nginx (Debian package) for the comparison" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
        # The package starts a system nginx on port 80; the bench runs its own, on its own
        # port, and does not need that one.
        if command -v systemctl >/dev/null 2>&1; then systemctl stop nginx 2>/dev/null || true; fi
        if [[ -f /run/nginx.pid ]]; then /usr/sbin/nginx -s quit 2>/dev/null || true; fi
    else
        echo "bench-e2e: nginx not installed and not root: the nginx rows will be skipped" >&2
    fi
fi

# 64 connections per path plus the proxy's and nginx's upstream pools fit easily, but a
# low default soft limit (1024) would not survive a larger E2E_CONNS.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r), load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
# cargo bench builds the release proxy binary too (the bench runs it as a child process).
exec cargo bench --bench e2e "$@"
