# chutes-proxy as a small sidecar image: a Rust builder stage, then a slim Debian runtime with
# only the binary, CA certificates and an unprivileged user.
#
#   docker build -t chutes-proxy .
#   docker run -d --name chutes-proxy --stop-timeout 35 -e CHUTES_API_KEY=cpk_... \
#     -p 127.0.0.1:8080:8080 -v chutes-proxy-state:/var/lib/chutes-proxy chutes-proxy
#
# Configuration: the image's config is the repository's config.toml (every key at its default)
# at /etc/chutes-proxy/config.toml; mount your own over it
# (`-v ./config.toml:/etc/chutes-proxy/config.toml:ro`) and check it with
# `docker run --rm -v ...:ro chutes-proxy --check`. Flags and CHUTES_PROXY_* variables
# override the file.
#
# Admin endpoints (/healthz /status /metrics) stay on the container's loopback, 127.0.0.1:9090,
# so nothing outside the container can read usage or limits unless you ask for it: set
# `-e CHUTES_PROXY_ADMIN_LISTEN=0.0.0.0:9090` AND mount a config with
# `[server] allow_remote_admin = true` (the proxy refuses a non-loopback admin address
# without it), then publish the port, ideally on the host's loopback only
# (`-p 127.0.0.1:9090:9090`). From inside the container it is always reachable:
# `docker exec chutes-proxy chutes-proxy status`.

# ---- build ----------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# The manifest declares benches, so their sources must be present for cargo to load it even
# though only the binary is built. tests/ is not needed; config.toml is (unit tests embed it).
COPY Cargo.toml Cargo.lock config.toml ./
COPY src ./src
COPY benches ./benches
# --locked: build exactly the dependency versions that were tested.
RUN cargo build --release --locked --bin chutes-proxy \
    && strip target/release/chutes-proxy

# ---- run ------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# TLS roots are compiled in (webpki-roots); ca-certificates is for operators who point the
# proxy at an upstream behind a private CA they add to the system store.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/chutes-proxy \
       --no-create-home --shell /usr/sbin/nologin chutes-proxy \
    && install -d -o chutes-proxy -g chutes-proxy -m 0750 /var/lib/chutes-proxy

COPY --from=builder /src/target/release/chutes-proxy /usr/local/bin/chutes-proxy
COPY config.toml /etc/chutes-proxy/config.toml

# Inside a container the proxy must listen on all interfaces to be reachable through a
# published port or a pod network; the admin listener keeps its loopback default (see above).
# The key comes from CHUTES_API_KEY at `docker run` (never baked into the image); a secret
# file works too (`upstream.api_key_file` in a mounted config).
ENV CHUTES_PROXY_LISTEN=0.0.0.0:8080 \
    CHUTES_PROXY_CONFIG=/etc/chutes-proxy/config.toml

# The state file (daily usage, cooldown) is `state.path`, relative by default
# (chutes-proxy-state.json), so it lands in the working directory: a volume that survives
# container restarts and upgrades, writable by the unprivileged user.
WORKDIR /var/lib/chutes-proxy
VOLUME ["/var/lib/chutes-proxy"]
USER chutes-proxy:chutes-proxy

EXPOSE 8080
# SIGTERM starts the graceful drain: in-flight requests and streams get up to
# server.shutdown_grace (30s by default) to finish, then the state is saved. Docker's own stop
# timeout is 10s, after which it sends SIGKILL, so run with `--stop-timeout 35` (or compose's
# `stop_grace_period: 35s`) to let long streams finish.
STOPSIGNAL SIGTERM
# No curl in the image: the binary checks itself through its admin listener (`status` exits
# non-zero if /status does not answer within 5s). `status` asks the address the proxy listens
# on: CHUTES_PROXY_ADMIN_LISTEN if set, else server.admin_listen of the config at
# CHUTES_PROXY_CONFIG (0.0.0.0 is asked on loopback), so moving the admin port needs no change
# here. Remove or override this only if you disable the admin listener (`admin_listen = ""`);
# the main port answers GET /healthz too, for probes from outside the container.
HEALTHCHECK --interval=30s --timeout=10s --start-period=5s --retries=3 \
    CMD ["chutes-proxy", "status"]

ENTRYPOINT ["chutes-proxy"]
