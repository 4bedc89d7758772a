#!/usr/bin/env bash
# kill -9 test: the daily cap holds across crashes.
#
# Runs the release proxy with `requests_per_day = KILL9_DAILY` (default 200) and a state file
# in front of a mock upstream that counts every request it receives (examples/soak.rs `mock
# --mode kill9`). Under load from `soak load`, the proxy is killed with SIGKILL at a random
# moment and restarted, KILL9_RESTARTS times (default 20); then it is started once more and
# loaded until it refuses with `daily_quota_exhausted`. The check: across all restarts the
# upstream saw at most KILL9_DAILY requests in the UTC day (the contract: after a crash the
# proxy may over-count a little but never admits more than the cap). It also reports how much
# of the cap the crashes cost (counted but never sent), and any panic in the logs.
#
# Knobs (env): KILL9_DAILY (200), KILL9_RESTARTS (20), KILL9_RPM (600: the cap is spent over
# ~20 s, i.e. across several kills), KILL9_CONCURRENCY (8), KILL9_DIR (work dir, default a
# temp dir). Needs curl and jq. Loopback only; only processes it started are signalled.
# Exit status: 0 if the cap held and nothing panicked; 1 otherwise; 2 if the run crossed a
# UTC midnight (the day's count restarts there, so the check would mean nothing).
set -euo pipefail

cd "$(dirname "$0")/.."
daily="${KILL9_DAILY:-200}"
restarts="${KILL9_RESTARTS:-20}"
rpm="${KILL9_RPM:-600}"
conc="${KILL9_CONCURRENCY:-8}"
dir="${KILL9_DIR:-$(mktemp -d -t chutes-kill9.XXXXXX)}"
mkdir -p "$dir"
for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "kill9: $tool is required" >&2; exit 1; }
done
day_at_start=$(date -u +%F)

echo "kill9: building release binaries..."
cargo build --release --quiet --bin chutes-proxy --example soak
proxy_bin=target/release/chutes-proxy
soak_bin=target/release/examples/soak

mock_pid=""
proxy_pid=""
load_pid=""
cleanup() {
    for p in $load_pid $proxy_pid $mock_pid; do
        kill -9 "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

rm -f "$dir/mock.port"
"$soak_bin" mock --port-file "$dir/mock.port" --mode kill9 2>"$dir/mock.log" &
mock_pid=$!
for _ in $(seq 100); do [ -s "$dir/mock.port" ] && break; sleep 0.1; done
[ -s "$dir/mock.port" ] || { echo "kill9: the mock did not start" >&2; exit 1; }
mock="http://127.0.0.1:$(cat "$dir/mock.port")"
received() { curl -sf "$mock/__soak/stats" | jq '.received'; }
state_used() { jq '.used' "$dir/state.json" 2>/dev/null || echo "-"; }

cat >"$dir/config.toml" <<EOF
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "2s"
[upstream]
url = "$mock"
[limits]
requests_per_minute = $rpm
burst = 10
requests_per_day = $daily
max_concurrent = 16
[queue]
max_wait = "2s"
[state]
path = "$dir/state.json"
EOF
rm -f "$dir/state.json"

# Starts the proxy logging to $1; sets proxy_pid, base and admin.
start_proxy() {
    CHUTES_API_KEY=cpk_kill9_key RUST_LOG=info NO_COLOR=1 \
        "$proxy_bin" --config "$dir/config.toml" 2>"$1" &
    proxy_pid=$!
    for _ in $(seq 200); do grep -q "listening on" "$1" 2>/dev/null && break; sleep 0.05; done
    local line
    line=$(grep -m1 "listening on" "$1") || { echo "kill9: the proxy did not start" >&2; cat "$1" >&2; exit 1; }
    base=$(sed -E 's/.*listening on (http:\/\/[0-9.:]+).*/\1/' <<<"$line")
    admin=$(sed -E 's/.*\(admin: (http:\/\/[0-9.:]+)\).*/\1/' <<<"$line")
}

echo "kill9: cap $daily/day, $restarts kills, $rpm req/min, $conc clients; mock at $mock; work dir $dir"
printf '%-6s %-8s %-18s %-14s\n' cycle "ran ms" "upstream received" "state.used"
for i in $(seq 1 "$restarts"); do
    start_proxy "$dir/proxy.$i.log"
    "$soak_bin" load --proxy "$base" --secs 30 --concurrency "$conc" --abort-rate 0.05 \
        --think-ms 5 >"$dir/load.$i.json" 2>/dev/null &
    load_pid=$!
    # A random moment: 0.2 .. 2.5 s into the run, so kills land during startup, bursts,
    # queueing and state writes alike.
    ms=$((200 + RANDOM % 2300))
    sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
    kill -9 "$proxy_pid"
    wait "$proxy_pid" 2>/dev/null || true
    proxy_pid=""
    kill "$load_pid" 2>/dev/null || true
    wait "$load_pid" 2>/dev/null || true
    load_pid=""
    printf '%-6s %-8s %-18s %-14s\n' "$i" "$ms" "$(received)" "$(state_used)"
done

# One last, clean life: load it until the cap refuses.
start_proxy "$dir/proxy.final.log"
"$soak_bin" load --proxy "$base" --secs 5 --concurrency "$conc" --abort-rate 0 --think-ms 5 \
    >"$dir/load.final.json" 2>/dev/null
status=$(curl -sf "$admin/status")
kill -TERM "$proxy_pid"
wait "$proxy_pid" || true
proxy_pid=""
final_received=$(received)
used=$(jq '.daily.used' <<<"$status")
exhausted=$(jq '.by_outcome["429_daily_quota_exhausted"] // 0' "$dir/load.final.json")
panics=$(cat "$dir"/proxy.*.log | grep -c "panicked" || true)
day_at_end=$(date -u +%F)

echo
echo "== after $restarts kill -9 and one clean run"
echo "  upstream received in total: $final_received (cap $daily)"
echo "  proxy's count for the day (reserved, includes what crashes cost): $used"
echo "  cap lost to crashes (counted, never sent): $((used - final_received))"
echo "  final run: $exhausted requests refused with daily_quota_exhausted"
echo "  panics in the logs: $panics"
echo "  work dir: $dir"
if [ "$day_at_start" != "$day_at_end" ]; then
    echo "kill9: the run crossed a UTC midnight ($day_at_start -> $day_at_end); rerun it" >&2
    exit 2
fi
fail=0
if [ "$final_received" -le "$daily" ]; then echo "  upstream received <= cap: PASS"; else echo "  upstream received <= cap: FAIL"; fail=1; fi
if [ "$used" -ge "$final_received" ]; then echo "  never under-counted: PASS"; else echo "  never under-counted: FAIL"; fail=1; fi
[ "$panics" = "0" ] || fail=1
exit $fail
