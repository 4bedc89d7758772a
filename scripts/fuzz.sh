#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time and prints executions and results.
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   FUZZ_SECS=600 scripts/fuzz.sh   # longer
#   scripts/fuzz.sh sse state       # some targets only
#
# cargo-fuzz (`cargo install cargo-fuzz --locked`) passes nightly-only flags (-Zsanitizer,
# -Cpasses=sancov). On a stable toolchain RUSTC_BOOTSTRAP=1 lets rustc accept them; the
# sanitizer runtimes ship with stable's standard library, so nothing else is needed. Set
# FUZZ_SANITIZER=none for a faster build and more executions per second (the proxy has no
# unsafe code of its own; the sanitizer guards dependencies).
#
# Corpora grow in fuzz/corpus/<target> (git-ignored), seeded from fuzz/seeds/<target>. A crash
# is written to fuzz/artifacts/<target>/; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz <target> fuzz/artifacts/<target>/<file>
# and put the input, fixed, into the unit tests of the module it broke.
# Exit status: 0 if every target ran its time without a failure, 1 otherwise.
set -uo pipefail

cd "$(dirname "$0")/.."
secs="${FUZZ_SECS:-60}"
sanitizer="${FUZZ_SANITIZER:-address}"
all_targets=(config headers units sse state quota bodies chutes_headers wildcard http1 http1_client)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 1
fi

echo "building fuzz targets (sanitizer: $sanitizer)..."
# `cargo fuzz build` takes one target, or none for all of them.
if [ $# -eq 0 ]; then
    cargo fuzz build --fuzz-dir fuzz -s "$sanitizer" || exit 1
else
    for t in "${targets[@]}"; do
        cargo fuzz build --fuzz-dir fuzz -s "$sanitizer" "$t" || exit 1
    done
fi

logdir="fuzz/artifacts/logs"  # git-ignored with the artifacts
mkdir -p "$logdir"
failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log="$logdir/$t.log"
    echo "fuzzing $t for ${secs}s..."
    # -timeout: an input taking over 10 s is a hang worth reporting;
    # -rss_limit_mb: a parser should never need 2 GiB.
    cargo fuzz run --fuzz-dir fuzz -s "$sanitizer" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    if [ $rc -eq 0 ]; then
        result="ok"
    else
        failed=1
        artifact=$(grep -o 'fuzz/artifacts/[^ ]*' "$log" | head -1)
        result="FAILED (exit $rc) ${artifact:-see $log}"
    fi
    summary+=("$(printf '%-14s %12s %10s %8s  %s' "$t" "${execs:-?}" "${rate:-?}" "$corpus" "$result")")
done

echo
printf '%-14s %12s %10s %8s  %s\n' target executions "exec/s" corpus result
for line in "${summary[@]}"; do echo "$line"; done
echo "(logs in $logdir/)"
exit $failed
