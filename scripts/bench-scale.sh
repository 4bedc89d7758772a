#!/usr/bin/env bash
# Scale bench: 10,000 clients queued at once through the release proxy (peak RSS, FIFO,
# every client answered by its deadline). Needs about 10,500 file descriptors in this process
# and in the proxy it starts: the bench raises its soft limit to the hard limit itself; this
# raises the hard limit first where we are allowed to (root).
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -Hn 65536 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "bench-scale: open files limit $(ulimit -n)" >&2
exec cargo bench --bench scale "$@"
