#!/usr/bin/env bash
# Instructions per request of one or more proxy builds, by callgrind: the A/B method of
# BENCHMARKS.md ("2026-12-01: issue 15"). Wall-clock numbers on a shared 2-core VM move 2×
# between runs; instruction counts of the same workload move by well under 1%.
#
#   scripts/callgrind-ab.sh BIN [BIN ...]        (default: target/release/chutes-proxy)
#
# For each build: nginx on loopback answers the e2e bench's 300-byte JSON completion; the proxy runs under
# `valgrind --tool=callgrind` in front of it; `wrk -t1 -c4 -d${CG_SECS:-15}s` sends the bench's
# JSON request through it; the proxy is stopped with SIGINT and its total instructions are
# divided by the requests wrk saw answered. Start-up and shutdown are under 1% of the total.
# Knobs: CG_SECS, CG_LOG (the proxy's RUST_LOG, default info), CG_TOML (config appended, e.g.
# $'[retry]\nmax_attempts = 0'),
# CG_CHUTES=1 (the upstream's answers carry Chutes' X-Chutes-Quota-*, X-Chutes-RL-* and
# X-Chutes-InvocationID headers),
# CG_SDK=1 (the request carries the fields openai-python 2.54.0 sends, read off one on loopback:
# Accept, Accept-Encoding, User-Agent and nine X-Stainless-* fields),
# CG_UPSTREAM (lines for the config's [upstream] table, e.g. 'http2 = true'),
# CG_FORMAT (text|json), CG_KEEP=1 keeps callgrind.out.1, .2, ... (one per build, for callgrind_annotate).
# CG_TLS=h2|h1: the upstream is nginx over TLS (a throwaway CA made with openssl, trusted through
# `upstream.tls_roots = "native"` and SSL_CERT_FILE), offering HTTP/2 by ALPN (h2) or HTTP/1.1
# only (h1): the path to Chutes, which a plain-HTTP upstream does not exercise. The nginx row
# then proxies to it over TLS too (HTTP/1.1 with keep-alive: nginx has no HTTP/2 upstreams).
# CG_NGINX=1 adds a row for nginx as the reverse proxy in the proxy's place (one worker, no master
# process, keep-alive to the upstream, an access log line per request as the proxy writes one):
# the baseline the issue's targets name, counted the same way.
#
# AB_MODE=cpu measures the same workload without valgrind: for each of AB_CONNS (default
# "1 16 64") connections, AB_ROUNDS (default 5) rounds of the builds in turn, `wrk -cN` for
# CG_SECS (default 3 here) against the plain release proxy, whose CPU time (utime + stime of
# all its threads, from /proc) is divided by the requests wrk saw answered. On a noisy host
# compare medians over the rounds (BENCHMARKS.md, fourth session).
set -euo pipefail
cd "$(dirname "$0")/.."
bins=("$@")
[[ ${#bins[@]} -gt 0 ]] || bins=(target/release/chutes-proxy)
secs=${CG_SECS:-15}
work=$(mktemp -d)
trap 'kill $(cat "$work"/nginx.pid 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(port)
reply='{"id":"chatcmpl-bench","object":"chat.completion","created":1767225600,"model":"bench/model","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how are you?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}'
mkdir -p "$work/nginx"
chutes_headers=""
if [[ ${CG_CHUTES:-0} == 1 ]]; then
    chutes_headers="add_header X-Chutes-Quota-Total 5000000; add_header X-Chutes-Quota-Used 812; \
add_header X-Chutes-Quota-Remaining 4999188; add_header X-Chutes-RL-User inf; add_header X-Chutes-RL-Chute inf; \
add_header X-Chutes-InvocationID 9b2e4c1a-5d7f-4e0b-8a3c-2f6d1e9b7a40;"
fi
scheme=http tls_listen="" tls_certs="" proxy_tls="" roots=""
if [[ -n ${CG_TLS:-} ]]; then
    # A CA and a leaf it signs for 127.0.0.1 (webpki refuses a self-signed CA as a server's).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=bench-ca -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
        -keyout "$work/leaf.key" -out "$work/leaf.csr" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' \
        >"$work/leaf.ext"
    openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
        -CAcreateserial -days 2 -extfile "$work/leaf.ext" -out "$work/leaf.pem" 2>/dev/null
    scheme=https
    case $CG_TLS in
    h2) tls_listen=" ssl http2" ;;
    h1) tls_listen=" ssl" ;;
    *) echo "CG_TLS is h2 or h1" >&2; exit 2 ;;
    esac
    tls_certs="ssl_certificate $work/leaf.pem; ssl_certificate_key $work/leaf.key; keepalive_timeout 300s;"
    proxy_tls="proxy_ssl_trusted_certificate $work/ca.pem; proxy_ssl_verify on; proxy_ssl_name 127.0.0.1; proxy_ssl_session_reuse on;"
    export SSL_CERT_FILE="$work/ca.pem"
    roots='tls_roots = "native"'
fi
cat >"$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$up$tls_listen;
        $tls_certs
        location / { default_type application/json; $chutes_headers return 200 '$reply'; }
    }
}
EOF
/usr/sbin/nginx -c "$work/nginx.conf" -p "$work"
cat >"$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-client"
EOF
if [[ ${CG_SDK:-0} == 1 ]]; then
    cat >>"$work/post.lua" <<'EOF'
wrk.headers["Accept"] = "application/json"
wrk.headers["Accept-Encoding"] = "gzip, deflate"
wrk.headers["User-Agent"] = "OpenAI/Python 2.54.0"
wrk.headers["X-Stainless-Lang"] = "python"
wrk.headers["X-Stainless-Package-Version"] = "2.54.0"
wrk.headers["X-Stainless-OS"] = "Linux"
wrk.headers["X-Stainless-Arch"] = "x64"
wrk.headers["X-Stainless-Runtime"] = "CPython"
wrk.headers["X-Stainless-Runtime-Version"] = "3.11.7"
wrk.headers["X-Stainless-Async"] = "false"
wrk.headers["x-stainless-retry-count"] = "0"
wrk.headers["x-stainless-read-timeout"] = "600"
EOF
fi
cat >>"$work/post.lua" <<'EOF'
wrk.body = '{"model":"bench/model","messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":16,"stream":false}'
EOF
cat >"$work/proxy.toml" <<EOF
[upstream]
url = "$scheme://127.0.0.1:$up"
$roots
${CG_UPSTREAM:-}
[limits]
requests_per_minute = 60000000
burst = 1000000
max_concurrent = 1024
[state]
path = ""
${CG_TOML:-}
EOF

start_proxy() { # bin listen [wrapper...]: the proxy on `listen`, in the background
    local bin=$1 listen=$2
    shift 2
    CHUTES_API_KEY=cpk_bench_not_a_real_key RUST_LOG=${CG_LOG:-info} \
        "$@" "$bin" --config "$work/proxy.toml" \
        --listen "127.0.0.1:$listen" --admin-listen "" --log-format "${CG_FORMAT:-text}" \
        2>"$work/proxy.log" &
    pid=$!
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$listen") 2>/dev/null && break
        sleep 0.1
    done
}

start_nginx() { # listen [wrapper...]: nginx as the reverse proxy on `listen`, in the background
    local listen=$1
    shift
    cat >"$work/nginx-proxy.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $work/nginx-proxy.pid;
error_log $work/nginx/proxy-error.log;
events { worker_connections 1024; }
http {
    access_log $work/nginx/access.log;
    client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
    keepalive_requests 1000000;
    upstream up { server 127.0.0.1:$up; keepalive 64; }
    server {
        listen 127.0.0.1:$listen;
        location / {
            proxy_pass $scheme://up;
            $proxy_tls
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer cpk_bench_not_a_real_key";
        }
    }
}
EOF
    "$@" /usr/sbin/nginx -c "$work/nginx-proxy.conf" -p "$work" 2>"$work/nginx-proxy.err" &
    pid=$!
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$listen") 2>/dev/null && break
        sleep 0.1
    done
}

if [[ ${AB_MODE:-callgrind} == cpu ]]; then
    secs=${CG_SECS:-3}
    tick=$(getconf CLK_TCK)
    cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
    printf '| build | connections | round | requests | 4xx/5xx | req/s | CPU per request |\n|---|---|---|---|---|---|---|\n'
    for c in ${AB_CONNS:-1 16 64}; do
        for round in $(seq "${AB_ROUNDS:-5}"); do
            rows=("${bins[@]}")
            if [[ ${CG_NGINX:-0} == 1 ]]; then rows+=(nginx); fi
            for bin in "${rows[@]}"; do
                listen=$(port)
                if [[ $bin == nginx ]]; then start_nginx "$listen"; else start_proxy "$bin" "$listen"; fi
                sleep 0.5
                t0=$(cpu_ticks "$pid")
                wrk -t1 -c"$c" -d"${secs}s" -s "$work/post.lua" \
                    "http://127.0.0.1:$listen/v1/chat/completions" >"$work/wrk.out"
                t1=$(cpu_ticks "$pid")
                reqs=$(awk '/requests in/ {print $1}' "$work/wrk.out")
                odd=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$work/wrk.out")
                if [[ $bin == nginx ]]; then kill -QUIT "$pid"; else kill -INT "$pid"; fi
                wait "$pid" || true
                printf '| %s | %s | %s | %s | %s | %.0f | %.0f µs |\n' "$bin" "$c" "$round" "$reqs" "${odd:-0}" \
                    "$(echo "$reqs / $secs" | bc -l)" "$(echo "($t1 - $t0) / $tick * 1000000 / $reqs" | bc -l)"
            done
        done
    done
    exit 0
fi

# Answers with a 4xx or 5xx status (the proxy's own 429s, say; wrk counts status > 399) are
# cheaper than a forwarded request: counted beside the total, so a run that has them is not
# read as a cheaper build.
load() { # wrk's closed loop against $listen for $secs: sets reqs and odd
    wrk -t1 -c4 -d"${secs}s" -s "$work/post.lua" "http://127.0.0.1:$listen/v1/chat/completions" \
        >"$work/wrk.out"
    reqs=$(awk '/requests in/ {print $1}' "$work/wrk.out")
    odd=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$work/wrk.out")
}
printf '| build | requests | 4xx/5xx | instructions | per request |\n|---|---|---|---|---|\n'
for bin in "${bins[@]}"; do
    listen=$(port)
    out="$work/callgrind.out"
    start_proxy "$bin" "$listen" valgrind --tool=callgrind --callgrind-out-file="$out"
    load
    kill -INT "$pid"
    wait "$pid" || true
    ir=$(awk '/^summary:/ {print $2}' "$out")
    n=$((${n:-0} + 1))
    if [[ ${CG_KEEP:-0} == 1 ]]; then cp "$out" "callgrind.out.$n"; fi
    printf '| %s | %s | %s | %s | %.1fk |\n' "$bin" "$reqs" "${odd:-0}" "$ir" \
        "$(echo "$ir / $reqs / 1000" | bc -l)"
done
if [[ ${CG_NGINX:-0} == 1 ]]; then
    listen=$(port)
    out="$work/callgrind.nginx"
    start_nginx "$listen" valgrind --tool=callgrind --callgrind-out-file="$out"
    load
    # SIGQUIT: a graceful stop, after which callgrind writes its counts.
    kill -QUIT "$pid"
    wait "$pid" || true
    ir=$(awk '/^summary:/ {print $2}' "$out")
    printf '| nginx (reverse proxy) | %s | %s | %s | %.1fk |\n' "$reqs" "${odd:-0}" "$ir" \
        "$(echo "$ir / $reqs / 1000" | bc -l)"
fi
