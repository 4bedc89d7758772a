#!/usr/bin/env bash
# Soak test: the release proxy under mixed traffic for SOAK_SECS (default 600), on loopback.
#
# A mock upstream (examples/soak.rs `mock`: normal replies, slow SSE streams, raw in-stream
# error lines, streams reset mid-body, a few 429s) sits behind the proxy; a load generator
# (`soak load`) sends requests with random client aborts (queued, mid-upload, mid-stream).
# Every SOAK_SAMPLE_SECS the proxy's RSS and open file descriptors are sampled from /proc.
#
# At the end it prints requests by outcome, the RSS/fd trend, panics in the log, and checks:
#   - no panic in the proxy's log;
#   - the proxy's daily count (/status daily.used) equals exactly the requests the mock saw,
#     except requests granted and on their way out when their client left: the proxy counts
#     those (it cannot know whether they were sent: never under-count), so each one the mock
#     never saw is identified by request id and must account for the whole difference;
#   - no request whose client left while queued reached the upstream;
#   - nothing is left queued or in flight once the load stops;
#   - RSS and fds are flat: the last quarter's average is within 25 % (+8 MiB / +16 fds) of
#     the second quarter's (the first quarter is warm-up: allocator arenas, connection pool).
# Exit status 0 if all hold.
#
# Knobs (env): SOAK_SECS (600), SOAK_CONCURRENCY (16 clients), SOAK_MAX_REQUESTS (2000000,
# the bound on count), SOAK_ABORT_RATE (0.1), SOAK_THINK_MS (50: mean pause between a
# client's requests is this), SOAK_SAMPLE_SECS (5), SOAK_DIR (work dir; default a temp dir,
# kept and printed). Needs curl and jq. Only processes it started are ever signalled.
set -euo pipefail

cd "$(dirname "$0")/.."
secs="${SOAK_SECS:-600}"
conc="${SOAK_CONCURRENCY:-16}"
max_requests="${SOAK_MAX_REQUESTS:-2000000}"
abort_rate="${SOAK_ABORT_RATE:-0.1}"
think_ms="${SOAK_THINK_MS:-50}"
sample_secs="${SOAK_SAMPLE_SECS:-5}"
dir="${SOAK_DIR:-$(mktemp -d -t chutes-soak.XXXXXX)}"
mkdir -p "$dir"
for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "soak: $tool is required" >&2; exit 1; }
done

echo "soak: building release binaries..."
cargo build --release --quiet --bin chutes-proxy --example soak
proxy_bin=target/release/chutes-proxy
soak_bin=target/release/examples/soak

mock_pid=""
proxy_pid=""
load_pid=""
cleanup() {
    for p in $load_pid $proxy_pid $mock_pid; do
        kill "$p" 2>/dev/null || true
    done
}
trap cleanup EXIT

# ----- mock upstream
rm -f "$dir/mock.port"
"$soak_bin" mock --port-file "$dir/mock.port" --mode soak 2>"$dir/mock.log" &
mock_pid=$!
for _ in $(seq 100); do [ -s "$dir/mock.port" ] && break; sleep 0.1; done
[ -s "$dir/mock.port" ] || { echo "soak: the mock did not start" >&2; exit 1; }
mock="http://127.0.0.1:$(cat "$dir/mock.port")"

# ----- the proxy
# Limits that let a good share of the load through (so streams, 429s and aborts all happen)
# while still shedding and queueing; a daily cap far above the run so every request counts
# without ever being refused for it, and a state file so the count is the durable one.
cat >"$dir/config.toml" <<EOF
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "10s"
[upstream]
url = "$mock"
connect_timeout = "2s"
first_byte_timeout = "10s"
idle_timeout = "5s"
[limits]
requests_per_minute = 3000
burst = 20
requests_per_day = 100000000
max_concurrent = 32
[queue]
max_depth = 500
max_wait = "5s"
[cooldown]
initial = "1s"
max = "5s"
multiplier = 2.0
decay_after = "10s"
[state]
path = "$dir/state.json"
EOF
rm -f "$dir/state.json"
CHUTES_API_KEY=cpk_soak_key RUST_LOG=info NO_COLOR=1 \
    "$proxy_bin" --config "$dir/config.toml" 2>"$dir/proxy.log" &
proxy_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$dir/proxy.log" 2>/dev/null && break; sleep 0.1; done
line=$(grep -m1 "listening on" "$dir/proxy.log") || { echo "soak: the proxy did not start" >&2; cat "$dir/proxy.log" >&2; exit 1; }
base=$(sed -E 's/.*listening on (http:\/\/[0-9.:]+).*/\1/' <<<"$line")
admin=$(sed -E 's/.*\(admin: (http:\/\/[0-9.:]+)\).*/\1/' <<<"$line")
echo "soak: proxy pid $proxy_pid at $base (admin $admin), mock at $mock, work dir $dir"
echo "soak: $secs s, $conc clients, abort rate $abort_rate, think ${think_ms} ms, at most $max_requests requests"

# ----- load, and sampling while it runs
"$soak_bin" load --proxy "$base" --secs "$secs" --concurrency "$conc" \
    --max-requests "$max_requests" --abort-rate "$abort_rate" --think-ms "$think_ms" \
    >"$dir/load.json" 2>"$dir/load.log" &
load_pid=$!
sample() {
    local rss fds
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$proxy_pid/status")
    fds=$(find "/proc/$proxy_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    echo "$1,$rss,$fds" >>"$dir/samples.csv"
}
echo "t_s,rss_kib,fds" >"$dir/samples.csv"
start=$(date +%s)
while kill -0 "$load_pid" 2>/dev/null; do
    sample $(($(date +%s) - start))
    # Progress every minute, so a long run shows it is alive.
    if [ $((($(date +%s) - start) % 60)) -lt "$sample_secs" ]; then
        tail -1 "$dir/samples.csv" | awk -F, '{printf "soak: t=%ss rss=%.1f MiB fds=%s\n", $1, $2/1024, $3}'
    fi
    sleep "$sample_secs"
done
wait "$load_pid" || { echo "soak: the load generator failed" >&2; cat "$dir/load.log" >&2; exit 1; }
load_pid=""

# ----- settle, then compare
settled=""
for _ in $(seq 300); do
    s=$(curl -sf "$admin/status") || true
    if [ -n "$s" ] && [ "$(jq '.queue.depth + .in_flight' <<<"$s")" = "0" ]; then settled=$s; break; fi
    sleep 0.1
done
sample "$(($(date +%s) - start))_idle"
[ -n "$settled" ] || { echo "soak: FAIL: requests still queued or in flight 30 s after the load stopped" >&2; exit 1; }
used=$(jq '.daily.used' <<<"$settled")
stats=$(curl -sf "$mock/__soak/stats")
received=$(jq '.received' <<<"$stats")

kill -TERM "$proxy_pid"
wait "$proxy_pid" || true
proxy_pid=""
panics=$(grep -c "panicked" "$dir/proxy.log" || true)

echo
echo "== requests by outcome (client side)"
jq -r '.by_outcome | to_entries[] | "  \(.key): \(.value)"' "$dir/load.json"
jq -r '"  total: \(.requests)"' "$dir/load.json"
echo "== what the mock upstream answered"
jq -r '.by_kind | to_entries[] | "  \(.key): \(.value)"' <<<"$stats"
echo "== proxy outcomes (/status requests)"
jq -r '.requests | to_entries[] | "  \(.key): \(.value)"' <<<"$settled" 2>/dev/null || true
echo "== RSS and open fds over time (samples in $dir/samples.csv)"
awk -F, 'NR > 1 { n++; t[n] = $1; r[n] = $2; f[n] = $3 }
    END {
        step = int(n / 10); if (step < 1) step = 1
        for (i = 1; i <= n; i += step) printf "  t=%-8s rss=%7.1f MiB  fds=%s\n", t[i], r[i] / 1024, f[i]
        if ((i - step) != n) printf "  t=%-8s rss=%7.1f MiB  fds=%s\n", t[n], r[n] / 1024, f[n]
    }' "$dir/samples.csv"
trend=$(awk -F, 'NR > 1 && $1 !~ /idle/ { n++; r[n] = $2; f[n] = $3 }
    END {
        q = int(n / 4); if (q < 1) { print "few"; exit }
        for (i = q + 1; i <= 2 * q; i++) { r2 += r[i]; f2 += f[i] }
        for (i = n - q + 1; i <= n; i++) { r4 += r[i]; f4 += f[i] }
        r2 /= q; r4 /= q; f2 /= q; f4 /= q
        flat = (r4 <= r2 * 1.25 + 8192 && f4 <= f2 * 1.25 + 16) ? "flat" : "GROWING"
        printf "%s rss %.1f -> %.1f MiB, fds %.0f -> %.0f (2nd vs last quarter)\n", flat, r2 / 1024, r4 / 1024, f2, f4
    }' "$dir/samples.csv")
echo "  trend: $trend"
echo "== checks"
fail=0
echo "  panics in the proxy log: $panics"
[ "$panics" = "0" ] || fail=1
echo "  daily count (/status daily.used): $used; mock upstream received: $received"
# Which requests explain a difference, by request id. A request the proxy granted and sent on
# its way, whose client left before any answer, is logged with `queue_wait_ms` (set at the
# grant) and `status=0`. The proxy counts it, since it cannot know whether its bytes left
# before the client did; one the upstream never saw is the only legitimate surplus. A client
# that left while still queued (no `queue_wait_ms`) must never reach the upstream at all.
curl -sf "$mock/__soak/ids" | sort >"$dir/received.ids"
grep ' request request_id=' "$dir/proxy.log" | grep ' status=0 ' >"$dir/left.log" || true
grep 'queue_wait_ms=' "$dir/left.log" | sed -E 's/.*request_id=([^ ]+).*/\1/' | sort >"$dir/left_granted.ids"
grep -v 'queue_wait_ms=' "$dir/left.log" | sed -E 's/.*request_id=([^ ]+).*/\1/' | sort >"$dir/left_queued.ids"
unsent=$(comm -23 "$dir/left_granted.ids" "$dir/received.ids" | wc -l)
leaked=$(comm -12 "$dir/left_queued.ids" "$dir/received.ids" | wc -l)
echo "  clients that left while queued: $(wc -l <"$dir/left_queued.ids"), of which reached the upstream: $leaked"
echo "  clients that left after the grant, before any answer: $(wc -l <"$dir/left_granted.ids"), of which the upstream never saw: $unsent"
if [ "$used" = "$received" ]; then
    echo "  daily count == upstream received: PASS (exact)"
elif [ $((used - received)) = "$unsent" ]; then
    echo "  daily count == upstream received + $unsent abandoned on the way out (listed in $dir/unsent.ids): PASS"
    comm -23 "$dir/left_granted.ids" "$dir/received.ids" >"$dir/unsent.ids"
else
    echo "  daily count == upstream received: FAIL (difference $((used - received)) not explained)"
    fail=1
fi
[ "$leaked" = "0" ] || { echo "  a request whose client left while queued reached the upstream: FAIL"; fail=1; }
case "$trend" in
    GROWING*) echo "  memory/fds: FAIL ($trend)"; fail=1 ;;
    *) echo "  memory/fds: ok ($trend)" ;;
esac
echo "  work dir: $dir"
exit $fail
