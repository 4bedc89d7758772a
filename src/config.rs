//! Configuration: TOML file + command-line overrides -> one validated, typed [`Config`].
//!
//! The file is read into a `toml::Table` and walked key by key rather than deserialised with
//! serde, so that *every* problem (a typo'd key, a bad duration, a zero rate) is reported at once,
//! each naming its dotted key. A typo must never silently drop a limit, so unknown keys are
//! errors. Everything downstream receives typed values (`Duration`, `NonZeroU32`, ...) and never
//! re-validates. This module does no I/O beyond reading the config file and the key file and
//! probing that `state.path`'s directory takes a new file (see [`check_state_dir`]), and holds
//! no global state: the `Config` is passed explicitly.
//!
//! Problems that make a config unworkable are errors; settings that work but cannot do what
//! they seem to say (a client's rate above the account's) are [`Config::warnings`], shown by
//! `--check` and logged at startup. [`Config::render`] writes the effective configuration as a
//! config file that loads back to the same configuration, secrets redacted.

use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use toml::{Table, Value};

use crate::units::{format_hhmm, parse_duration, parse_hhmm, parse_size};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Chat requests with long contexts are a few hundred KiB; 4 MiB leaves room for images.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 4 * 1024 * 1024;
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Each idle keep-alive connection costs a task and a few KiB; 10,000 fits well under 64 MiB.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// hyper's default read buffer; request heads larger than this are answered 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
pub const DEFAULT_UPSTREAM_URL: &str = "https://llm.chutes.ai";
pub const DEFAULT_API_KEY_ENV: &str = "CHUTES_API_KEY";
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Large models can think for a long time before their first token.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Below Chutes' edge limit of about 60/min, leaving headroom for clock skew between edges.
pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 50;
pub const DEFAULT_BURST: u32 = 5;
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
pub const DEFAULT_QUEUE_DEPTH: usize = 1000;
/// 64 MiB: thousands of chat bodies of a few KiB, sixteen bodies at the 4 MiB limit.
pub const DEFAULT_QUEUE_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Long enough to ride out normal spacing, short enough that callers' own timeouts do not fire.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(20);
pub const DEFAULT_COOLDOWN_INITIAL: Duration = Duration::from_secs(30);
pub const DEFAULT_COOLDOWN_MAX: Duration = Duration::from_secs(3600);
pub const DEFAULT_COOLDOWN_MULTIPLIER: f64 = 2.0;
/// A quiet period this long after a cooldown ends forgets the escalation level.
pub const DEFAULT_COOLDOWN_DECAY: Duration = Duration::from_secs(600);
pub const DEFAULT_STATE_PATH: &str = "chutes-proxy-state.json";
/// No duration setting makes sense beyond a year, and bounding them keeps every
/// `Instant + Duration` in the proxy far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const DEFAULT_KEY_PREFIX: &str = "chutes-proxy:";

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub limits: Limits,
    pub queue: QueueConfig,
    pub cooldown: CooldownConfig,
    pub state: StateConfig,
    pub clients: ClientsConfig,
    pub shared_state: SharedStateConfig,
    pub retry: RetryConfig,
    /// Settings that are valid but will not do what they seem to say, each naming its key.
    pub warnings: Vec<ConfigError>,
}

/// What the proxy does once the upstream's quota headers say the plan's daily quota is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeyondQuota {
    /// Close the daily gate until the reset, so nothing is billed pay-as-you-go.
    Stop,
    /// Keep forwarding (the account pays as it goes).
    Continue,
}

/// Where the account's daily usage is polled from (`upstream.quota_url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaSource {
    /// No polling.
    Off,
    /// Poll this URL (with the account key) every `upstream.quota_poll`.
    Url(String),
}

/// Chutes' management API answer for the account's default daily quota.
pub const CHUTES_QUOTA_URL: &str = "https://api.chutes.ai/users/me/quota_usage/me";
/// Often enough to notice usage from outside the proxy within minutes, rare enough to cost
/// a negligible share of the account's requests (6 an hour).
pub const DEFAULT_QUOTA_POLL: Duration = Duration::from_secs(600);
/// A model at capacity usually frees an instance within seconds.
pub const DEFAULT_MODEL_COOLDOWN_INITIAL: Duration = Duration::from_secs(5);
pub const DEFAULT_MODEL_COOLDOWN_MAX: Duration = Duration::from_secs(120);
/// Chat bodies are a few KiB to a few hundred KiB; a 1 MiB copy per queued retry is bounded.
pub const DEFAULT_RETRY_MAX_BODY: u64 = 1024 * 1024;

/// Upstream 429s retried on the client's behalf.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Re-sends after an upstream 429; 0 = off.
    pub max_attempts: u32,
    /// Request bodies larger than this are not kept for a retry.
    pub max_body: u64,
}

/// One `[limits.model_cost]` entry: a model-name pattern with `*` wildcards and its cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCost {
    pub pattern: String,
    pub cost: NonZeroU32,
}

/// Where the account budget lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// This process only (plus `state.path`).
    Local,
    /// Shared by every replica through Redis.
    Redis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisError {
    FailClosed,
    Local,
}

#[derive(Debug, Clone)]
pub struct SharedStateConfig {
    pub backend: Backend,
    pub redis_url: String,
    pub key_prefix: String,
    pub on_redis_error: OnRedisError,
    pub local_fallback_share: f64,
    /// `limits.max_concurrent` counts the whole fleet (leases in Redis), not each replica.
    pub global_concurrency: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// `None` when `admin_listen = ""`.
    pub admin_listen: Option<SocketAddr>,
    pub allow_remote_admin: bool,
    pub shutdown_grace: Duration,
    pub max_request_body: u64,
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    /// `server.admin_token_env`: the variable holding the token that lets a non-loopback peer
    /// use the admin endpoints that change something (`POST /reload`).
    pub admin_token_env: Option<String>,
    pub admin_token: Option<ApiKey>,
}

#[derive(Clone)]
pub struct UpstreamConfig {
    pub url: UpstreamUrl,
    /// Where the key came from, for `--check` and the startup line (never the key itself).
    pub api_key_source: String,
    pub api_key: Option<ApiKey>,
    /// The variable the key is read from ("" = none), kept so `--check` can write it back.
    pub api_key_env: String,
    /// The file the key is read from instead, if any.
    pub api_key_file: Option<PathBuf>,
    /// Refuse to start without a key (rather than pass each client's own auth through).
    pub require_key: bool,
    pub auth_header: HeaderName,
    pub auth_prefix: String,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    /// Which CAs the upstream's certificate may chain to.
    pub tls_roots: TlsRoots,
    /// Over TLS, offer HTTP/2 by ALPN (one shared connection per shard) besides HTTP/1.1
    /// (one connection per exchange in flight, the cheaper per request: BENCHMARKS.md).
    pub http2: bool,
    /// The account usage poll (`quota_url`, resolved: `"auto"` becomes Chutes' endpoint when
    /// `url` is on llm.chutes.ai, else off).
    pub quota_source: QuotaSource,
    pub quota_poll: Duration,
}

/// Trust anchors for the upstream's TLS certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRoots {
    /// Mozilla's roots compiled in (webpki-roots): the same everywhere, no system files needed.
    Webpki,
    /// The operating system's store, e.g. for a corporate CA or a TLS-inspecting egress proxy.
    Native,
}

impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("url", &self.url.to_string())
            .field("api_key", &self.api_key)
            .field("api_key_source", &self.api_key_source)
            .field("api_key_env", &self.api_key_env)
            .field("api_key_file", &self.api_key_file)
            .field("require_key", &self.require_key)
            .field("auth_header", &self.auth_header)
            .field("auth_prefix", &self.auth_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("first_byte_timeout", &self.first_byte_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("tls_roots", &self.tls_roots)
            .field("http2", &self.http2)
            .finish()
    }
}

/// The upstream API key. Its `Debug` and `Display` are redacted so that no log line, error or
/// `--check` output can ever contain it; the only way out is [`ApiKey::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: String) -> Self {
        ApiKey(key)
    }
    /// The raw key, for building the upstream auth header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// scheme + authority + optional path prefix (without trailing slash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub authority: Authority,
    pub path_prefix: String,
}

impl UpstreamUrl {
    pub fn is_https(&self) -> bool {
        self.scheme == Scheme::HTTPS
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme, self.authority, self.path_prefix
        )
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub requests_per_minute: NonZeroU32,
    pub burst: NonZeroU32,
    /// `None` = no daily cap.
    pub requests_per_day: Option<NonZeroU64>,
    /// Seconds after 00:00 UTC at which the daily count resets.
    pub day_reset_offset: u32,
    pub max_concurrent: usize,
    pub beyond_quota: BeyondQuota,
    /// Whether `X-Chutes-RL-User` / `-RL-Chute` may lower the rate in force.
    pub follow_upstream_limits: bool,
    /// `[limits.model_cost]` in file order (the first match wins).
    pub model_cost: Vec<ModelCost>,
}

impl Limits {
    /// Daily units one request to `model` costs: the first matching `[limits.model_cost]`
    /// pattern, else 1.
    pub fn cost_of(&self, model: Option<&str>) -> u32 {
        let Some(m) = model else { return 1 };
        self.model_cost
            .iter()
            .find(|c| crate::model::wildcard_match(&c.pattern, m))
            .map_or(1, |c| c.cost.get())
    }
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub max_depth: usize,
    pub max_wait: Duration,
    /// The bytes of request bodies read before admission that waiting requests may hold
    /// together (`src/held.rs`).
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct CooldownConfig {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub decay_after: Duration,
    /// A capacity 429 cools its model for this long at first ...
    pub model_initial: Duration,
    /// ... growing by `multiplier` up to this.
    pub model_max: Duration,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    /// `None` = memory only.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ClientsConfig {
    pub require_token: bool,
    pub default_weight: NonZeroU32,
    pub clients: Vec<ClientConfig>,
}

#[derive(Clone)]
pub struct ClientConfig {
    pub name: String,
    pub token_env: Option<String>,
    pub token: Option<ApiKey>,
    pub weight: NonZeroU32,
    pub requests_per_minute: Option<NonZeroU32>,
    pub burst: NonZeroU32,
    pub requests_per_day: Option<NonZeroU64>,
    pub max_wait: Option<Duration>,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("name", &self.name)
            .field("token_env", &self.token_env)
            .field("token", &self.token)
            .field("weight", &self.weight)
            .field("requests_per_minute", &self.requests_per_minute)
            .field("burst", &self.burst)
            .field("requests_per_day", &self.requests_per_day)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}

/// Values given on the command line (or their env vars); each replaces the file's key.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub upstream: Option<String>,
}

/// One problem with the configuration, naming the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found, in file order.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    fn one(key: &str, message: impl Into<String>) -> Self {
        ConfigErrors(vec![ConfigError {
            key: key.to_string(),
            message: message.into(),
        }])
    }
}

/// Where environment values come from; tests pass a map instead of touching the process env.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Env for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

impl Config {
    /// Load from `path` (if any), apply `overrides`, validate. `explicit` says whether the user
    /// named the file (a missing named file is an error; a missing default file means defaults).
    pub fn load(
        path: Option<&Path>,
        explicit: bool,
        overrides: &Overrides,
        env: &dyn Env,
    ) -> Result<Config, ConfigErrors> {
        let text = match path {
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => t,
                Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => {
                    return Err(ConfigErrors::one(
                        "",
                        format!("cannot read config file {}: {e}", p.display()),
                    ))
                }
            },
            None => String::new(),
        };
        Config::from_toml(&text, overrides, env)
    }

    /// Parse and validate TOML text with overrides.
    pub fn from_toml(
        text: &str,
        overrides: &Overrides,
        env: &dyn Env,
    ) -> Result<Config, ConfigErrors> {
        let mut table: Table = text
            .parse::<Table>()
            .map_err(|e| ConfigErrors(vec![toml_error(text, &e)]))?;
        apply_overrides(&mut table, overrides);
        let mut v = Validator::default();
        let cfg = v.config(table, env);
        match cfg {
            Some(mut cfg) if v.errors.is_empty() => {
                cfg.warnings = v.warnings;
                Ok(cfg)
            }
            _ => Err(ConfigErrors(v.errors)),
        }
    }

    /// Defaults only (plus the process env for the key); used by tests and benches.
    pub fn defaults_with(env: &dyn Env) -> Config {
        Config::from_toml("", &Overrides::default(), env).expect("built-in defaults are valid")
    }

    /// The effective configuration as a config file, for `--check`: loading it back (in the
    /// same environment) gives the same configuration, and rendering that gives the same text.
    /// Secrets never appear: the API key and client tokens are named by where they come from
    /// (`api_key_env`, `api_key_file`, `token_env`), which is also what makes the output load
    /// back, and a Redis URL's password is replaced by `<redacted>`.
    pub fn render(&self) -> String {
        let s = &self.server;
        let u = &self.upstream;
        let l = &self.limits;
        let mut out = String::new();
        use std::fmt::Write as _;
        let _ = writeln!(out, "[server]");
        let _ = writeln!(out, "listen = {}", q(&s.listen.to_string()));
        let _ = writeln!(
            out,
            "admin_listen = {}",
            q(&s.admin_listen.map(|a| a.to_string()).unwrap_or_default())
        );
        let _ = writeln!(out, "allow_remote_admin = {}", s.allow_remote_admin);
        let _ = writeln!(out, "shutdown_grace = {}", q(&fmt_dur(s.shutdown_grace)));
        let _ = writeln!(out, "max_request_body = {}", s.max_request_body);
        let _ = writeln!(
            out,
            "header_read_timeout = {}",
            q(&fmt_dur(s.header_read_timeout))
        );
        let _ = writeln!(out, "max_connections = {}", s.max_connections);
        let _ = writeln!(out, "max_header_bytes = {}", s.max_header_bytes);
        if let Some(env) = &s.admin_token_env {
            let _ = writeln!(out, "admin_token_env = {}", q(env));
        }
        let _ = writeln!(out, "\n[upstream]");
        let _ = writeln!(out, "url = {}", q(&u.url.to_string()));
        let key_state = match &u.api_key {
            Some(_) => format!("set (from {}, redacted)", u.api_key_source),
            None => format!(
                "not set ({}): client Authorization passes through",
                u.api_key_source
            ),
        };
        let _ = writeln!(out, "# api key: {key_state}");
        let _ = writeln!(out, "api_key_env = {}", q(&u.api_key_env));
        if let Some(f) = &u.api_key_file {
            let _ = writeln!(out, "api_key_file = {}", q(&f.display().to_string()));
        }
        let _ = writeln!(out, "require_key = {}", u.require_key);
        let _ = writeln!(out, "auth_header = {}", q(u.auth_header.as_str()));
        let _ = writeln!(out, "auth_prefix = {}", q(&u.auth_prefix));
        let _ = writeln!(out, "connect_timeout = {}", q(&fmt_dur(u.connect_timeout)));
        let _ = writeln!(
            out,
            "first_byte_timeout = {}",
            q(&fmt_dur(u.first_byte_timeout))
        );
        let _ = writeln!(out, "idle_timeout = {}", q(&fmt_dur(u.idle_timeout)));
        let _ = writeln!(
            out,
            "quota_url = {}",
            q(match &u.quota_source {
                QuotaSource::Off => "",
                QuotaSource::Url(url) => url.as_str(),
            })
        );
        let _ = writeln!(out, "quota_poll = {}", q(&fmt_dur(u.quota_poll)));
        let _ = writeln!(
            out,
            "tls_roots = {}",
            q(match u.tls_roots {
                TlsRoots::Webpki => "webpki",
                TlsRoots::Native => "native",
            })
        );
        let _ = writeln!(out, "http2 = {}", u.http2);
        let _ = writeln!(out, "\n[limits]");
        let _ = writeln!(out, "requests_per_minute = {}", l.requests_per_minute);
        let _ = writeln!(out, "burst = {}", l.burst);
        let _ = writeln!(
            out,
            "requests_per_day = {}",
            l.requests_per_day.map_or(0, |d| d.get())
        );
        let _ = writeln!(
            out,
            "day_reset_utc = {}",
            q(&format_hhmm(l.day_reset_offset))
        );
        let _ = writeln!(out, "max_concurrent = {}", l.max_concurrent);
        let _ = writeln!(
            out,
            "beyond_quota = \"{}\"",
            match l.beyond_quota {
                BeyondQuota::Stop => "stop",
                BeyondQuota::Continue => "continue",
            }
        );
        let _ = writeln!(out, "follow_upstream_limits = {}", l.follow_upstream_limits);
        if !l.model_cost.is_empty() {
            let _ = writeln!(out, "\n[limits.model_cost]");
            for c in &l.model_cost {
                let _ = writeln!(out, "{} = {}", q(&c.pattern), c.cost);
            }
        }
        let _ = writeln!(out, "\n[queue]");
        let _ = writeln!(out, "max_depth = {}", self.queue.max_depth);
        let _ = writeln!(out, "max_wait = {}", q(&fmt_dur(self.queue.max_wait)));
        let _ = writeln!(out, "max_body_bytes = {}", self.queue.max_body_bytes);
        let c = &self.cooldown;
        let _ = writeln!(out, "\n[cooldown]");
        let _ = writeln!(out, "initial = {}", q(&fmt_dur(c.initial)));
        let _ = writeln!(out, "max = {}", q(&fmt_dur(c.max)));
        let _ = writeln!(out, "multiplier = {:?}", c.multiplier);
        let _ = writeln!(out, "decay_after = {}", q(&fmt_dur(c.decay_after)));
        let _ = writeln!(out, "model_initial = {}", q(&fmt_dur(c.model_initial)));
        let _ = writeln!(out, "model_max = {}", q(&fmt_dur(c.model_max)));
        let _ = writeln!(out, "\n[retry]");
        let _ = writeln!(out, "max_attempts = {}", self.retry.max_attempts);
        let _ = writeln!(out, "max_body = {}", self.retry.max_body);
        let _ = writeln!(out, "\n[state]");
        let _ = writeln!(
            out,
            "path = {}",
            q(&self
                .state
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default())
        );
        let ss = &self.shared_state;
        let _ = writeln!(out, "\n[shared_state]");
        let _ = writeln!(
            out,
            "backend = {}",
            q(if ss.backend == Backend::Redis {
                "redis"
            } else {
                "local"
            })
        );
        if ss.backend == Backend::Redis {
            // A Redis URL may carry a password: show only where it points.
            let shown = match ss.redis_url.rsplit_once('@') {
                Some((_, host)) => format!("redis://<redacted>@{host}"),
                None => ss.redis_url.clone(),
            };
            let _ = writeln!(out, "redis_url = {}", q(&shown));
            let _ = writeln!(out, "key_prefix = {}", q(&ss.key_prefix));
            let _ = writeln!(
                out,
                "on_redis_error = {}",
                q(if ss.on_redis_error == OnRedisError::Local {
                    "local"
                } else {
                    "fail_closed"
                })
            );
            let _ = writeln!(out, "local_fallback_share = {:?}", ss.local_fallback_share);
            let _ = writeln!(out, "global_concurrency = {}", ss.global_concurrency);
        }
        let cl = &self.clients;
        let _ = writeln!(out, "\n[clients]");
        let _ = writeln!(out, "require_token = {}", cl.require_token);
        let _ = writeln!(out, "default_weight = {}", cl.default_weight);
        for c in &cl.clients {
            let _ = writeln!(out, "\n[[clients.client]]");
            let _ = writeln!(out, "name = {}", q(&c.name));
            if let Some(env) = &c.token_env {
                let state = if c.token.is_some() {
                    "set, redacted"
                } else {
                    "NOT SET"
                };
                let _ = writeln!(out, "token_env = {}  # {state}", q(env));
            }
            let _ = writeln!(out, "weight = {}", c.weight);
            if let Some(r) = c.requests_per_minute {
                let _ = writeln!(out, "requests_per_minute = {r}");
                let _ = writeln!(out, "burst = {}", c.burst);
            }
            if let Some(d) = c.requests_per_day {
                let _ = writeln!(out, "requests_per_day = {d}");
            }
            if let Some(w) = c.max_wait {
                let _ = writeln!(out, "max_wait = {}", q(&fmt_dur(w)));
            }
        }
        out
    }
}

/// A TOML string literal (the toml crate's own escaping, so any text reads back as itself;
/// Rust's `{:?}` escapes some characters in ways TOML does not read).
fn q(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// Can the proxy keep its state at `path`? Its directory must exist and take a new file: the
/// writer replaces the file by renaming a temp file created beside it, so that is exactly the
/// permission it needs (the file itself may be read-only, it is never written in place).
///
/// Probed by creating and removing a temp file there, at load and so also by `--check`:
/// permission bits alone do not tell (a read-only mount, `/proc`, an ACL, a full quota), and
/// without the probe such a path is found only at the first request that needs a
/// reservation, which then waits instead of being served. The probe leaves nothing behind.
pub fn check_state_dir(path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if path.is_dir() {
        return Err(format!(
            "{} is a directory; name a file in it, e.g. {}",
            path.display(),
            path.join(DEFAULT_STATE_PATH).display()
        ));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory", dir.display())),
        Err(e) => {
            return Err(format!(
            "directory {} cannot be used: {} (create it, or set state.path = \"\" for memory only)",
            dir.display(),
            e.kind()
        ))
        }
    }
    tempfile::Builder::new()
        .prefix(".chutes-proxy-probe")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| {
            format!(
                "cannot create files in {}: {} (the state file is replaced by a temp file written beside it)",
                dir.display(),
                e.kind()
            )
        })
}

/// A TOML syntax error as a [`ConfigError`] that says where: line and column, the offending
/// line with a caret under the spot. An integer too large for TOML's 64 bits is a parse error
/// to the toml crate, but to a user it is an out-of-range value, so it names its dotted key.
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let Some(span) = e.span() else {
        return ConfigError {
            key: String::new(),
            message: format!("invalid TOML: {}", e.message().trim()),
        };
    };
    // Byte offsets from the parser, made safe to slice whatever they are: this runs on
    // arbitrary input and must not panic.
    let mut start = span.start.min(text.len());
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = span.end.clamp(start, text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line_no = text[..line_start].matches('\n').count() + 1;
    let col = text[line_start..start].chars().count() + 1;
    let line = text[line_start..line_end].trim_end_matches('\r');
    let value = text[start..end].trim();
    // Only a plain decimal literal: a malformed one (`0x`, `1__2`) is a syntax error.
    let is_number = !value.is_empty()
        && value
            .trim_start_matches(['+', '-'])
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'_');
    if e.message().contains("integer") && is_number {
        if let Some(key) = key_at(text, line_start, line) {
            return ConfigError {
                key,
                message: format!(
                    "{value} is out of range (line {line_no}, column {col}; integers must fit in 64 bits)"
                ),
            };
        }
    }
    let width = text[start..end.min(line_end)].chars().count().max(1);
    let gutter = line_no.to_string().len();
    ConfigError {
        key: String::new(),
        message: format!(
            "invalid TOML at line {line_no}, column {col}: {}\n{:gutter$} |\n{line_no} | {line}\n{:gutter$} | {}{}",
            e.message().trim(),
            "",
            "",
            " ".repeat(col - 1),
            "^".repeat(width),
        ),
    }
}

/// The dotted key of the `key = value` line starting at `line_start`, from the table header
/// above it (`[limits]`, `[[clients.client]]` counted as `clients.client[i]`).
fn key_at(text: &str, line_start: usize, line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() {
        return None;
    }
    let mut table = String::new();
    let mut arrays: std::collections::HashMap<String, usize> = Default::default();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split_once("]]")) {
            let name = name.0.trim().to_string();
            let n = arrays.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split_once(']')) {
            table = name.0.trim().to_string();
        }
    }
    Some(if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    })
}

/// A duration in the config's own syntax, for `--check` output: the largest unit it is a
/// whole number of (`h`, `m`, `s`, `ms`, `us`, `ns`), so it reads back as exactly itself.
pub fn fmt_dur(d: Duration) -> String {
    const UNITS: [(u128, &str); 5] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
    ];
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    for (unit, name) in UNITS {
        if ns.is_multiple_of(unit) {
            return format!("{}{name}", ns / unit);
        }
    }
    format!("{ns}ns")
}

fn apply_overrides(table: &mut Table, o: &Overrides) {
    let mut set = |section: &str, key: &str, value: &Option<String>| {
        if let Some(v) = value {
            let sec = table
                .entry(section.to_string())
                .or_insert_with(|| Value::Table(Table::new()));
            if let Value::Table(t) = sec {
                t.insert(key.to_string(), Value::String(v.clone()));
            }
        }
    };
    set("server", "listen", &o.listen);
    set("server", "admin_listen", &o.admin_listen);
    set("upstream", "url", &o.upstream);
}

/// Collects errors (and warnings) while walking the table.
#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
}

/// One TOML table being read; keys are removed as they are read so leftovers are unknown.
struct Section {
    prefix: String,
    table: Table,
}

impl Validator {
    fn err(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn warn(&mut self, key: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn section(&mut self, root: &mut Table, name: &str) -> Section {
        let table = match root.remove(name) {
            None => Table::new(),
            Some(Value::Table(t)) => t,
            Some(other) => {
                self.err(
                    name,
                    format!("expected a table [{name}], found {}", other.type_str()),
                );
                Table::new()
            }
        };
        Section {
            prefix: name.to_string(),
            table,
        }
    }

    fn finish(&mut self, s: Section) {
        let mut keys: Vec<_> = s.table.keys().cloned().collect();
        keys.sort();
        for k in keys {
            self.err(&format!("{}.{k}", s.prefix), "unknown key");
        }
    }

    fn str_val(&mut self, s: &mut Section, key: &str, default: &str) -> Option<String> {
        let full = format!("{}.{key}", s.prefix);
        match s.table.remove(key) {
            None => Some(default.to_string()),
            Some(Value::String(v)) => Some(v),
            Some(other) => {
                self.err(
                    &full,
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn bool_val(&mut self, s: &mut Section, key: &str, default: bool) -> bool {
        let full = format!("{}.{key}", s.prefix);
        match s.table.remove(key) {
            None => default,
            Some(Value::Boolean(b)) => b,
            Some(other) => {
                self.err(
                    &full,
                    format!("expected true or false, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn int_val(&mut self, s: &mut Section, key: &str, default: i64, min: i64, max: i64) -> i64 {
        let full = format!("{}.{key}", s.prefix);
        match s.table.remove(key) {
            None => default,
            Some(Value::Integer(i)) if (min..=max).contains(&i) => i,
            Some(Value::Integer(i)) => {
                self.err(&full, format!("{i} is out of range ({min}..={max})"));
                default
            }
            Some(other) => {
                self.err(
                    &full,
                    format!("expected an integer, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn float_val(&mut self, s: &mut Section, key: &str, default: f64, min: f64, max: f64) -> f64 {
        let full = format!("{}.{key}", s.prefix);
        let v = match s.table.remove(key) {
            None => return default,
            Some(Value::Float(f)) => f,
            Some(Value::Integer(i)) => i as f64,
            Some(other) => {
                self.err(
                    &full,
                    format!("expected a number, found {}", other.type_str()),
                );
                return default;
            }
        };
        if v.is_finite() && v >= min && v <= max {
            v
        } else {
            self.err(&full, format!("{v} is out of range ({min}..={max})"));
            default
        }
    }

    fn duration_val(&mut self, s: &mut Section, key: &str, default: Duration) -> Duration {
        let full = format!("{}.{key}", s.prefix);
        match s.table.remove(key) {
            None => default,
            Some(Value::String(v)) => match parse_duration(&v) {
                Ok(d) if d > MAX_DURATION => {
                    self.err(
                        &full,
                        format!("{v:?} is longer than the 365 days any setting may be"),
                    );
                    default
                }
                Ok(d) => d,
                Err(e) => {
                    self.err(&full, e);
                    default
                }
            },
            Some(other) => {
                self.err(
                    &full,
                    format!(
                        "expected a duration string like \"20s\", found {}",
                        other.type_str()
                    ),
                );
                default
            }
        }
    }

    fn positive_duration(&mut self, s: &mut Section, key: &str, default: Duration) -> Duration {
        let d = self.duration_val(s, key, default);
        if d.is_zero() {
            self.err(&format!("{}.{key}", s.prefix), "must be greater than zero");
            return default;
        }
        d
    }

    fn config(&mut self, mut root: Table, env: &dyn Env) -> Option<Config> {
        let server = self.server(&mut root, env);
        let upstream = self.upstream(&mut root, env);
        let limits = self.limits(&mut root);
        let queue = self.queue(&mut root);
        let cooldown = self.cooldown(&mut root);
        let state = self.state(&mut root);
        let clients = self.clients(&mut root, env, queue.max_wait);
        for (i, c) in clients.clients.iter().enumerate() {
            if let Some(rpm) = c
                .requests_per_minute
                .filter(|r| *r > limits.requests_per_minute)
            {
                self.warn(
                    &format!("clients.client[{i}].requests_per_minute"),
                    format!(
                        "{rpm} is above the account's limits.requests_per_minute ({}); the \
                         account's rate binds first, so this cap never does",
                        limits.requests_per_minute
                    ),
                );
            }
        }
        let shared_state = self.shared_state(&mut root);
        let retry = self.retry(&mut root);
        let mut names: Vec<_> = root.keys().cloned().collect();
        names.sort();
        for k in names {
            self.err(&k, "unknown section or key");
        }
        Some(Config {
            server: server?,
            upstream: upstream?,
            limits,
            queue,
            cooldown,
            state,
            clients,
            shared_state,
            retry,
            warnings: Vec::new(),
        })
    }

    fn server(&mut self, root: &mut Table, env: &dyn Env) -> Option<ServerConfig> {
        let mut s = self.section(root, "server");
        let listen = self.str_val(&mut s, "listen", DEFAULT_LISTEN);
        let listen = listen.and_then(|v| match v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    "server.listen",
                    format!("{v:?} is not an address like \"127.0.0.1:8080\""),
                );
                None
            }
        });
        let admin = self.str_val(&mut s, "admin_listen", DEFAULT_ADMIN_LISTEN);
        let allow_remote_admin = self.bool_val(&mut s, "allow_remote_admin", false);
        let admin_listen = match admin {
            Some(v) if v.is_empty() => Some(None),
            Some(v) => {
                match v.parse::<SocketAddr>() {
                    Ok(a) if !a.ip().is_loopback() && !allow_remote_admin => {
                        self.err(
                            "server.admin_listen",
                            format!(
                                "{v} is not a loopback address; the admin endpoints expose \
                             limits and usage, so set server.allow_remote_admin = true to \
                             bind it anyway"
                            ),
                        );
                        None
                    }
                    Ok(a) => Some(Some(a)),
                    Err(_) => {
                        self.err(
                        "server.admin_listen",
                        format!("{v:?} is not an address like \"127.0.0.1:9090\" (or \"\" to disable)"),
                    );
                        None
                    }
                }
            }
            None => None,
        };
        let shutdown_grace = self.duration_val(&mut s, "shutdown_grace", DEFAULT_SHUTDOWN_GRACE);
        let max_request_body =
            self.size_val(&mut s, "server.max_request_body", DEFAULT_MAX_REQUEST_BODY);
        if max_request_body == 0 {
            // Zero would refuse every request with a body, i.e. every chat completion.
            self.err(
                "server.max_request_body",
                "must be greater than zero (every completion request has a body)",
            );
        }
        if let (Some(l), Some(Some(a))) = (listen, admin_listen) {
            // Port 0 asks the OS for a fresh port on each bind, so two zeros never collide.
            if l == a && l.port() != 0 {
                self.err(
                    "server.admin_listen",
                    format!(
                        "{a} is also server.listen; the two listeners need different addresses"
                    ),
                );
            }
        }
        let header_read_timeout =
            self.positive_duration(&mut s, "header_read_timeout", DEFAULT_HEADER_READ_TIMEOUT);
        let max_connections = self.int_val(
            &mut s,
            "max_connections",
            DEFAULT_MAX_CONNECTIONS as i64,
            1,
            1_000_000,
        ) as usize;
        let max_header_bytes = self.int_val(
            &mut s,
            "max_header_bytes",
            DEFAULT_MAX_HEADER_BYTES as i64,
            8192,
            1 << 24,
        ) as usize;
        let admin_token_env = self
            .str_val(&mut s, "admin_token_env", "")
            .filter(|v| !v.is_empty());
        let admin_token = match &admin_token_env {
            Some(name) => match env.var(name).map(|t| t.trim().to_string()) {
                Some(t) if !t.is_empty() => Some(ApiKey(t)),
                Some(_) => {
                    self.err("server.admin_token_env", format!("{name} is set but empty"));
                    None
                }
                // Unset: only loopback peers may reload, as without the key.
                None => None,
            },
            None => None,
        };
        self.finish(s);
        Some(ServerConfig {
            listen: listen?,
            admin_listen: admin_listen?,
            allow_remote_admin,
            shutdown_grace,
            max_request_body,
            header_read_timeout,
            max_connections,
            max_header_bytes,
            admin_token_env,
            admin_token,
        })
    }

    fn upstream(&mut self, root: &mut Table, env: &dyn Env) -> Option<UpstreamConfig> {
        let mut s = self.section(root, "upstream");
        let url = self
            .str_val(&mut s, "url", DEFAULT_UPSTREAM_URL)
            .and_then(|v| match parse_upstream_url(&v) {
                Ok(u) => Some(u),
                Err(e) => {
                    self.err("upstream.url", e);
                    None
                }
            });
        let key_env = self
            .str_val(&mut s, "api_key_env", DEFAULT_API_KEY_ENV)
            .unwrap_or_default();
        let require_key = self.bool_val(&mut s, "require_key", false);
        let key_file = match s.table.remove("api_key_file") {
            None => None,
            Some(Value::String(p)) if p.is_empty() => None,
            Some(Value::String(p)) => Some(PathBuf::from(p)),
            Some(other) => {
                self.err(
                    "upstream.api_key_file",
                    format!("expected a path string, found {}", other.type_str()),
                );
                None
            }
        };
        let (api_key, api_key_source) = if let Some(path) = &key_file {
            match std::fs::read_to_string(path) {
                Ok(k) if !k.trim().is_empty() => (
                    Some(ApiKey(k.trim().to_string())),
                    format!("file {}", path.display()),
                ),
                Ok(_) => {
                    self.err(
                        "upstream.api_key_file",
                        format!("{} is empty", path.display()),
                    );
                    (None, String::new())
                }
                Err(e) => {
                    self.err(
                        "upstream.api_key_file",
                        format!("cannot read {}: {}", path.display(), e.kind()),
                    );
                    (None, String::new())
                }
            }
        } else if key_env.is_empty() {
            (None, "no api_key_env configured".into())
        } else {
            match env.var(&key_env).map(|k| k.trim().to_string()) {
                Some(k) if !k.is_empty() => (Some(ApiKey(k)), format!("env {key_env}")),
                Some(_) => {
                    // Set but empty is a mistake (a secret that did not render), never a
                    // request to run without a key: that is "unset".
                    self.err(
                        "upstream.api_key_env",
                        format!("environment variable {key_env} is set but empty"),
                    );
                    (None, format!("env {key_env} is empty"))
                }
                None => (None, format!("env {key_env} is unset")),
            }
        };
        if require_key
            && api_key.is_none()
            && self
                .errors
                .iter()
                .all(|e| !e.key.starts_with("upstream.api_key"))
        {
            self.err(
                "upstream.require_key",
                format!(
                    "true, but no key is configured ({api_key_source}); set {} or upstream.api_key_file",
                    if key_env.is_empty() { "upstream.api_key_env" } else { key_env.as_str() }
                ),
            );
        }
        if let Some(k) = &api_key {
            if k.0.bytes().any(|b| b < 0x20 || b == 0x7f) {
                self.err(
                    "upstream.api_key",
                    format!("the key from {api_key_source} contains control characters"),
                );
            }
        }
        let auth_header = self
            .str_val(&mut s, "auth_header", "authorization")
            .and_then(|h| match HeaderName::from_bytes(h.as_bytes()) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.err(
                        "upstream.auth_header",
                        format!("{h:?} is not a valid header name"),
                    );
                    None
                }
            });
        let auth_prefix = self
            .str_val(&mut s, "auth_prefix", "Bearer ")
            .unwrap_or_default();
        if auth_prefix
            .bytes()
            .any(|b| b < 0x20 && b != b'\t' || b == 0x7f)
        {
            self.err("upstream.auth_prefix", "contains control characters");
        }
        let connect_timeout =
            self.positive_duration(&mut s, "connect_timeout", DEFAULT_CONNECT_TIMEOUT);
        let first_byte_timeout =
            self.positive_duration(&mut s, "first_byte_timeout", DEFAULT_FIRST_BYTE_TIMEOUT);
        let idle_timeout = self.positive_duration(&mut s, "idle_timeout", DEFAULT_IDLE_TIMEOUT);
        let tls_roots = match self.str_val(&mut s, "tls_roots", "webpki").as_deref() {
            Some("webpki") | None => TlsRoots::Webpki,
            Some("native") => TlsRoots::Native,
            Some(other) => {
                self.err(
                    "upstream.tls_roots",
                    format!("{other:?}: expected \"webpki\" or \"native\""),
                );
                TlsRoots::Webpki
            }
        };
        let http2 = self.bool_val(&mut s, "http2", false);
        let quota_url = self
            .str_val(&mut s, "quota_url", "auto")
            .unwrap_or_default();
        let quota_source = match quota_url.as_str() {
            "" => QuotaSource::Off,
            "auto" => match &url {
                Some(u) if u.authority.host().eq_ignore_ascii_case("llm.chutes.ai") => {
                    QuotaSource::Url(CHUTES_QUOTA_URL.to_string())
                }
                _ => QuotaSource::Off,
            },
            other => match other.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http") | Some("https"))
                        && uri.authority().is_some() =>
                {
                    QuotaSource::Url(other.to_string())
                }
                _ => {
                    self.err(
                        "upstream.quota_url",
                        format!("{other:?} is not \"auto\", \"\" or an http(s) URL"),
                    );
                    QuotaSource::Off
                }
            },
        };
        let quota_poll = self.positive_duration(&mut s, "quota_poll", DEFAULT_QUOTA_POLL);
        self.finish(s);
        Some(UpstreamConfig {
            url: url?,
            api_key_source,
            api_key,
            api_key_env: key_env,
            api_key_file: key_file,
            require_key,
            auth_header: auth_header?,
            auth_prefix,
            connect_timeout,
            first_byte_timeout,
            idle_timeout,
            tls_roots,
            http2,
            quota_source,
            quota_poll,
        })
    }

    fn limits(&mut self, root: &mut Table) -> Limits {
        let mut s = self.section(root, "limits");
        let rpm = self.int_val(
            &mut s,
            "requests_per_minute",
            DEFAULT_REQUESTS_PER_MINUTE as i64,
            1,
            60_000_000,
        );
        let burst = self.int_val(&mut s, "burst", DEFAULT_BURST as i64, 1, 1_000_000);
        let per_day = self.int_val(&mut s, "requests_per_day", 0, 0, i64::MAX);
        let reset = self
            .str_val(&mut s, "day_reset_utc", "00:00")
            .and_then(|v| match parse_hhmm(&v) {
                Ok(x) => Some(x),
                Err(e) => {
                    self.err("limits.day_reset_utc", e);
                    None
                }
            })
            .unwrap_or(0);
        let max_concurrent = self.int_val(
            &mut s,
            "max_concurrent",
            DEFAULT_MAX_CONCURRENT as i64,
            1,
            1_000_000,
        ) as usize;
        let beyond_quota = match self.str_val(&mut s, "beyond_quota", "stop").as_deref() {
            Some("stop") | None => BeyondQuota::Stop,
            Some("continue") => BeyondQuota::Continue,
            Some(other) => {
                self.err(
                    "limits.beyond_quota",
                    format!("{other:?}: expected \"stop\" or \"continue\""),
                );
                BeyondQuota::Stop
            }
        };
        let follow_upstream_limits = self.bool_val(&mut s, "follow_upstream_limits", true);
        let model_cost = match s.table.remove("model_cost") {
            None => Vec::new(),
            Some(Value::Table(t)) => {
                let mut out = Vec::new();
                for (pattern, v) in t {
                    let key = format!("limits.model_cost.{pattern:?}");
                    match v {
                        Value::Integer(n) if (1..=1_000_000).contains(&n) => out.push(ModelCost {
                            pattern,
                            cost: NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN),
                        }),
                        Value::Integer(n) => {
                            self.err(&key, format!("{n} is out of range (1..=1000000)"))
                        }
                        other => self.err(
                            &key,
                            format!("expected an integer cost, found {}", other.type_str()),
                        ),
                    }
                }
                out
            }
            Some(other) => {
                self.err(
                    "limits.model_cost",
                    format!("expected a table, found {}", other.type_str()),
                );
                Vec::new()
            }
        };
        self.finish(s);
        Limits {
            requests_per_minute: NonZeroU32::new(rpm as u32).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(burst as u32).unwrap_or(NonZeroU32::MIN),
            requests_per_day: NonZeroU64::new(per_day as u64),
            day_reset_offset: reset,
            max_concurrent,
            beyond_quota,
            follow_upstream_limits,
            model_cost,
        }
    }

    /// A size (`"4MiB"`, or a number of bytes) at `key` (`section.name`), or `default`.
    fn size_val(&mut self, s: &mut Section, key: &str, default: u64) -> u64 {
        let name = key.rsplit('.').next().unwrap_or(key);
        match s.table.remove(name) {
            None => default,
            Some(Value::String(v)) => match parse_size(&v) {
                Ok(n) => n,
                Err(e) => {
                    self.err(key, e);
                    default
                }
            },
            Some(Value::Integer(i)) if i >= 0 => i as u64,
            Some(other) => {
                self.err(
                    key,
                    format!("expected a size like \"4MiB\", found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn queue(&mut self, root: &mut Table) -> QueueConfig {
        let mut s = self.section(root, "queue");
        let max_depth = self.int_val(
            &mut s,
            "max_depth",
            DEFAULT_QUEUE_DEPTH as i64,
            0,
            10_000_000,
        ) as usize;
        let max_wait = self.duration_val(&mut s, "max_wait", DEFAULT_MAX_WAIT);
        let max_body_bytes =
            self.size_val(&mut s, "queue.max_body_bytes", DEFAULT_QUEUE_BODY_BYTES);
        if max_body_bytes == 0 {
            self.err(
                "queue.max_body_bytes",
                "must be greater than zero (every completion request has a body)",
            );
        }
        self.finish(s);
        QueueConfig {
            max_depth,
            max_wait,
            max_body_bytes,
        }
    }

    fn cooldown(&mut self, root: &mut Table) -> CooldownConfig {
        let mut s = self.section(root, "cooldown");
        let initial = self.positive_duration(&mut s, "initial", DEFAULT_COOLDOWN_INITIAL);
        let max = self.positive_duration(&mut s, "max", DEFAULT_COOLDOWN_MAX);
        let multiplier = self.float_val(
            &mut s,
            "multiplier",
            DEFAULT_COOLDOWN_MULTIPLIER,
            1.0,
            100.0,
        );
        let decay_after = self.positive_duration(&mut s, "decay_after", DEFAULT_COOLDOWN_DECAY);
        let model_initial =
            self.positive_duration(&mut s, "model_initial", DEFAULT_MODEL_COOLDOWN_INITIAL);
        let model_max = self.positive_duration(&mut s, "model_max", DEFAULT_MODEL_COOLDOWN_MAX);
        if model_initial > model_max {
            self.err(
                "cooldown.model_initial",
                format!(
                    "{} is longer than cooldown.model_max ({})",
                    fmt_dur(model_initial),
                    fmt_dur(model_max)
                ),
            );
        }
        if initial > max {
            self.err(
                "cooldown.initial",
                format!(
                    "{} is longer than cooldown.max ({})",
                    fmt_dur(initial),
                    fmt_dur(max)
                ),
            );
        }
        self.finish(s);
        CooldownConfig {
            initial,
            max,
            multiplier,
            decay_after,
            model_initial,
            model_max,
        }
    }

    fn retry(&mut self, root: &mut Table) -> RetryConfig {
        let mut s = self.section(root, "retry");
        let max_attempts = self.int_val(&mut s, "max_attempts", 1, 0, 10) as u32;
        let max_body = match s.table.remove("max_body") {
            None => DEFAULT_RETRY_MAX_BODY,
            Some(Value::String(v)) => parse_size(&v).unwrap_or_else(|e| {
                self.err("retry.max_body", e);
                DEFAULT_RETRY_MAX_BODY
            }),
            Some(Value::Integer(i)) if i >= 0 => i as u64,
            Some(other) => {
                self.err(
                    "retry.max_body",
                    format!("expected a size like \"1MiB\", found {}", other.type_str()),
                );
                DEFAULT_RETRY_MAX_BODY
            }
        };
        self.finish(s);
        RetryConfig {
            max_attempts,
            max_body,
        }
    }

    fn state(&mut self, root: &mut Table) -> StateConfig {
        let mut s = self.section(root, "state");
        let path = self
            .str_val(&mut s, "path", DEFAULT_STATE_PATH)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        if let Some(p) = &path {
            if let Err(e) = check_state_dir(p) {
                self.err("state.path", e);
            }
        }
        self.finish(s);
        StateConfig { path }
    }

    fn shared_state(&mut self, root: &mut Table) -> SharedStateConfig {
        let mut s = self.section(root, "shared_state");
        let backend = match self.str_val(&mut s, "backend", "local").as_deref() {
            Some("local") | None => Backend::Local,
            Some("redis") => Backend::Redis,
            Some(other) => {
                self.err(
                    "shared_state.backend",
                    format!("{other:?}: expected \"local\" or \"redis\""),
                );
                Backend::Local
            }
        };
        let redis_url = self
            .str_val(&mut s, "redis_url", DEFAULT_REDIS_URL)
            .unwrap_or_default();
        if backend == Backend::Redis && redis::Client::open(redis_url.as_str()).is_err() {
            self.err(
                "shared_state.redis_url",
                format!("{redis_url:?} is not a Redis URL like \"redis://127.0.0.1:6379/0\""),
            );
        }
        let key_prefix = self
            .str_val(&mut s, "key_prefix", DEFAULT_KEY_PREFIX)
            .unwrap_or_default();
        if key_prefix.is_empty() {
            self.err(
                "shared_state.key_prefix",
                "must not be empty (it names the account in Redis)",
            );
        }
        let on_redis_error = match self
            .str_val(&mut s, "on_redis_error", "fail_closed")
            .as_deref()
        {
            Some("fail_closed") | None => OnRedisError::FailClosed,
            Some("local") => OnRedisError::Local,
            Some(other) => {
                self.err(
                    "shared_state.on_redis_error",
                    format!("{other:?}: expected \"fail_closed\" or \"local\""),
                );
                OnRedisError::FailClosed
            }
        };
        let local_fallback_share = self.float_val(&mut s, "local_fallback_share", 0.5, 0.0, 1.0);
        let global_concurrency = self.bool_val(&mut s, "global_concurrency", false);
        self.finish(s);
        SharedStateConfig {
            backend,
            redis_url,
            key_prefix,
            on_redis_error,
            local_fallback_share,
            global_concurrency,
        }
    }

    fn clients(&mut self, root: &mut Table, env: &dyn Env, max_wait: Duration) -> ClientsConfig {
        let mut s = self.section(root, "clients");
        let require_token = self.bool_val(&mut s, "require_token", false);
        let default_weight = self.int_val(&mut s, "default_weight", 1, 1, 1000);
        let list = match s.table.remove("client") {
            None => Vec::new(),
            Some(Value::Array(a)) => a,
            Some(other) => {
                self.err(
                    "clients.client",
                    format!(
                        "expected [[clients.client]] entries, found {}",
                        other.type_str()
                    ),
                );
                Vec::new()
            }
        };
        self.finish(s);
        let mut clients = Vec::new();
        for (i, item) in list.into_iter().enumerate() {
            let prefix = format!("clients.client[{i}]");
            let Value::Table(t) = item else {
                self.err(&prefix, "expected a table");
                continue;
            };
            let mut c = Section { prefix, table: t };
            let name = self.str_val(&mut c, "name", "").unwrap_or_default();
            if name.is_empty()
                || name == "default"
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                self.err(
                    &format!("{}.name", c.prefix),
                    format!("{name:?}: a client needs a name of letters, digits, '-', '_' or '.', other than \"default\""),
                );
            } else if clients.iter().any(|x: &ClientConfig| x.name == name) {
                self.err(
                    &format!("{}.name", c.prefix),
                    format!("{name:?} is configured twice"),
                );
            }
            let token_env = match c.table.remove("token_env") {
                None => None,
                Some(Value::String(e)) if !e.is_empty() => Some(e),
                Some(_) => {
                    self.err(
                        &format!("{}.token_env", c.prefix),
                        "expected the name of an environment variable",
                    );
                    None
                }
            };
            let token = token_env
                .as_ref()
                .and_then(|e| env.var(e))
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .map(ApiKey);
            if let (Some(e), None) = (&token_env, &token) {
                self.err(
                    &format!("{}.token_env", c.prefix),
                    format!("environment variable {e} is unset or empty"),
                );
            }
            let weight = self.int_val(&mut c, "weight", default_weight, 1, 1000) as u32;
            let rpm = self.int_val(&mut c, "requests_per_minute", 0, 0, 60_000_000) as u32;
            let burst = self.int_val(&mut c, "burst", 1, 1, 1_000_000) as u32;
            let per_day = self.int_val(&mut c, "requests_per_day", 0, 0, i64::MAX) as u64;
            let cmw = match c.table.contains_key("max_wait") {
                true => {
                    let d = self.duration_val(&mut c, "max_wait", max_wait);
                    if d > max_wait {
                        self.err(
                            &format!("{}.max_wait", c.prefix),
                            format!(
                                "{} is longer than queue.max_wait ({})",
                                fmt_dur(d),
                                fmt_dur(max_wait)
                            ),
                        );
                    }
                    Some(d.min(max_wait))
                }
                false => None,
            };
            if require_token && token_env.is_none() {
                // With require_token every request must carry a known token, so a client
                // without one could never be used: almost surely a forgotten line.
                self.err(
                    &format!("{}.token_env", c.prefix),
                    "clients.require_token = true, so every configured client needs a token_env",
                );
            }
            self.finish(c);
            clients.push(ClientConfig {
                name,
                token_env,
                token,
                weight: NonZeroU32::new(weight).unwrap_or(NonZeroU32::MIN),
                requests_per_minute: NonZeroU32::new(rpm),
                burst: NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN),
                requests_per_day: NonZeroU64::new(per_day),
                max_wait: cmw,
            });
        }
        ClientsConfig {
            require_token,
            default_weight: NonZeroU32::new(default_weight as u32).unwrap_or(NonZeroU32::MIN),
            clients,
        }
    }
}

/// `scheme://host[:port][/prefix]`; no query, fragment or userinfo.
pub fn parse_upstream_url(v: &str) -> Result<UpstreamUrl, String> {
    let uri: http::Uri = v
        .parse()
        .map_err(|_| format!("{v:?} is not a URL like \"https://llm.chutes.ai\""))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("{v:?} needs a scheme (https:// or http://)"))?;
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!(
            "{v:?}: only http and https upstreams are supported"
        ));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{v:?} has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "{v:?}: credentials in the URL are not supported; use upstream.api_key_env"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("{v:?}: a query string is not allowed here"));
    }
    let path_prefix = uri.path().trim_end_matches('/').to_string();
    Ok(UpstreamUrl {
        scheme,
        authority,
        path_prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_none(_: &str) -> Option<String> {
        None
    }

    fn load(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_toml(text, &Overrides::default(), &env_none)
    }

    #[test]
    fn durations_are_written_in_their_largest_whole_unit_and_read_back_exactly() {
        let cases: &[(Duration, &str)] = &[
            (Duration::ZERO, "0s"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(1500), "1500us"),
            (Duration::from_micros(500), "500us"),
            (Duration::from_nanos(1), "1ns"),
            (Duration::from_nanos(1_000_000_001), "1000000001ns"),
            (Duration::MAX, "18446744073709551615999999999ns"),
        ];
        for (d, want) in cases {
            assert_eq!(fmt_dur(*d), *want, "{d:?}");
        }
        for d in cases.iter().map(|c| c.0).chain([
            Duration::from_nanos(123_456_789),
            Duration::from_secs(86_400 * 365),
            Duration::new(59, 999_999_999),
        ]) {
            assert_eq!(crate::units::parse_duration(&fmt_dur(d)), Ok(d), "{d:?}");
        }
    }

    fn keys(e: ConfigErrors) -> Vec<String> {
        e.0.into_iter().map(|e| e.key).collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = load("").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.server.admin_listen.unwrap().to_string(), "127.0.0.1:9090");
        assert_eq!(c.upstream.url.to_string(), "https://llm.chutes.ai");
        assert_eq!(c.limits.requests_per_minute.get(), 50);
        assert_eq!(c.limits.burst.get(), 5);
        assert_eq!(c.limits.requests_per_day, None);
        assert_eq!(c.limits.max_concurrent, 16);
        assert_eq!(
            crate::admission::Settings::from_config(&c).spacing(),
            Duration::from_millis(1200)
        );
        assert_eq!(c.queue.max_depth, 1000);
        assert_eq!(c.queue.max_wait, Duration::from_secs(20));
        assert_eq!(c.cooldown.initial, Duration::from_secs(30));
        assert_eq!(c.server.max_request_body, 4 * 1024 * 1024);
        assert_eq!(
            c.state.path.as_deref(),
            Some(Path::new("chutes-proxy-state.json"))
        );
        assert!(c.upstream.api_key.is_none());
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let e = load(
            r#"
            [server]
            listen = "nope"
            shutdown_grace = "forever"
            [limits]
            requests_per_minute = 0
            burts = 3
            day_reset_utc = "25:00"
            [queue]
            max_wait = 20
            [cooldown]
            initial = "2h"
            [bogus]
            "#,
        )
        .unwrap_err();
        let k = keys(e);
        for want in [
            "server.listen",
            "server.shutdown_grace",
            "limits.requests_per_minute",
            "limits.burts",
            "limits.day_reset_utc",
            "queue.max_wait",
            "cooldown.initial",
            "bogus",
        ] {
            assert!(k.iter().any(|x| x == want), "missing {want} in {k:?}");
        }
    }

    #[test]
    fn remote_admin_needs_explicit_consent() {
        let e = load("[server]\nadmin_listen = \"0.0.0.0:9090\"").unwrap_err();
        assert_eq!(keys(e), vec!["server.admin_listen"]);
        let c =
            load("[server]\nadmin_listen = \"0.0.0.0:9090\"\nallow_remote_admin = true").unwrap();
        assert!(c.server.admin_listen.is_some());
        let c = load("[server]\nadmin_listen = \"\"").unwrap();
        assert!(c.server.admin_listen.is_none());
    }

    #[test]
    fn upstream_url_forms() {
        let u = parse_upstream_url("http://127.0.0.1:3000/prefix/").unwrap();
        assert_eq!(u.path_prefix, "/prefix");
        assert_eq!(u.to_string(), "http://127.0.0.1:3000/prefix");
        assert!(parse_upstream_url("ftp://x").is_err());
        assert!(parse_upstream_url("llm.chutes.ai").is_err());
        assert!(parse_upstream_url("https://user:pw@host").is_err());
        assert!(parse_upstream_url("https://host/?q=1").is_err());
    }

    #[test]
    fn key_comes_from_env_and_is_redacted_everywhere() {
        let env = |n: &str| (n == "CHUTES_API_KEY").then(|| "cpk_secret_value".to_string());
        let c = Config::from_toml("", &Overrides::default(), &env).unwrap();
        assert_eq!(
            c.upstream.api_key.as_ref().unwrap().expose(),
            "cpk_secret_value"
        );
        assert!(!format!("{c:?}").contains("cpk_secret_value"));
        assert!(!c.render().contains("cpk_secret_value"));
    }

    #[test]
    fn overrides_replace_file_values_and_are_validated() {
        let o = Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: Some("not a url".into()),
            ..Default::default()
        };
        let e = Config::from_toml("[server]\nlisten = \"1.2.3.4:1\"", &o, &env_none).unwrap_err();
        assert_eq!(keys(e), vec!["upstream.url"]);
        let o = Overrides {
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        };
        let c = Config::from_toml("[server]\nlisten = \"1.2.3.4:1\"", &o, &env_none).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:0");
    }

    #[test]
    fn invalid_toml_is_one_clear_error() {
        let e = load("[server\nlisten=").unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert!(e.to_string().starts_with("invalid TOML"));
    }

    /// Issue 18: the error said where, but squashed toml's multi-line report onto one line.
    #[test]
    fn a_toml_syntax_error_says_line_and_column_and_shows_the_line() {
        let e = load("[limits]\nburst = 5\nrequests_per_minute = = 3\n").unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("invalid TOML at line 3, column 23: "),
            "{text}"
        );
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[2], "3 | requests_per_minute = = 3");
        assert_eq!(lines[3], "  |                       ^");
    }

    /// Issue 18: an integer too large for TOML was a parse error naming no key.
    #[test]
    fn an_out_of_range_integer_names_its_key() {
        let e = load("[limits]\nburst = 99999999999\n").unwrap_err();
        assert_eq!(keys(e), vec!["limits.burst"]);
        let e =
            load("[server]\nlisten = \"127.0.0.1:1\"\n[limits]\nburst = 99999999999999999999\n")
                .unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert_eq!(e.0[0].key, "limits.burst", "{e}");
        assert!(
            e.0[0]
                .message
                .contains("99999999999999999999 is out of range"),
            "{e}"
        );
        let e = load(
            "[[clients.client]]\nname = \"a\"\n[[clients.client]]\nname = \"b\"\nrequests_per_day = 123456789012345678901\n",
        )
        .unwrap_err();
        assert_eq!(keys(e), vec!["clients.client[1].requests_per_day"]);
    }

    #[test]
    fn syntax_errors_never_panic_on_odd_text() {
        for text in [
            "é = 99999999999999999999",
            "[ü]\nx = 1e",
            "x = \"unterminated",
            "a = 0x",
            "[[a]]\n[[a]]\nb = -99999999999999999999\r\n",
            "ключ = = 1",
            "\u{1F600}",
            "=",
        ] {
            let e = load(text).unwrap_err();
            assert!(!e.0.is_empty(), "{text:?}");
        }
        let e = load("[[a]]\n[[a]]\nb = -99999999999999999999\n").unwrap_err();
        assert_eq!(keys(e), vec!["a[1].b"]);
        let e = load("a = 0x\n").unwrap_err();
        assert!(e.to_string().starts_with("invalid TOML at line 1"), "{e}");
    }

    /// Issue 18, item 12: configs that cannot work are refused by `--check`, not met later.
    #[test]
    fn configs_that_cannot_work_are_refused() {
        let e = load("[server]\nlisten = \"127.0.0.1:9090\"\nadmin_listen = \"127.0.0.1:9090\"\n")
            .unwrap_err();
        assert_eq!(keys(e), vec!["server.admin_listen"]);
        // Port 0 is a fresh port per bind, so the tests' 127.0.0.1:0 twice is fine.
        let o = Overrides {
            listen: Some("127.0.0.1:0".into()),
            admin_listen: Some("127.0.0.1:0".into()),
            upstream: None,
        };
        assert!(Config::from_toml("", &o, &env_none).is_ok());
        for body in ["0", "\"0\"", "\"0KiB\""] {
            let e = load(&format!("[server]\nmax_request_body = {body}\n")).unwrap_err();
            assert_eq!(keys(e), vec!["server.max_request_body"], "{body}");
        }
        let env = |n: &str| (n == "A_TOKEN").then(|| "tok-a".to_string());
        let e = Config::from_toml(
            "[clients]\nrequire_token = true\n[[clients.client]]\nname = \"a\"\ntoken_env = \"A_TOKEN\"\n[[clients.client]]\nname = \"b\"\n",
            &Overrides::default(),
            &env,
        )
        .unwrap_err();
        assert_eq!(keys(e), vec!["clients.client[1].token_env"]);
    }

    #[test]
    fn a_client_rate_above_the_accounts_is_a_warning_not_an_error() {
        let c = load("[limits]\nrequests_per_minute = 50\n[[clients.client]]\nname = \"a\"\nrequests_per_minute = 100\n[[clients.client]]\nname = \"b\"\nrequests_per_minute = 50\n")
            .unwrap();
        let w: Vec<_> = c.warnings.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(w, vec!["clients.client[0].requests_per_minute"]);
        assert!(c.warnings[0].message.contains("above"), "{:?}", c.warnings);
    }

    /// Issue 18, item 11.
    #[test]
    fn an_empty_key_is_an_error_and_require_key_refuses_none() {
        let empty = |n: &str| (n == "CHUTES_API_KEY").then(|| "  ".to_string());
        let e = Config::from_toml("", &Overrides::default(), &empty).unwrap_err();
        assert_eq!(keys(e), vec!["upstream.api_key_env"]);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "\n").unwrap();
        let e = load(&format!(
            "[upstream]\napi_key_file = {:?}\n",
            f.display().to_string()
        ))
        .unwrap_err();
        assert_eq!(keys(e), vec!["upstream.api_key_file"]);
        // Unset is allowed (client auth passes through) unless require_key says otherwise.
        let c = load("").unwrap();
        assert!(c.upstream.api_key.is_none() && !c.upstream.require_key);
        let e = load("[upstream]\nrequire_key = true\n").unwrap_err();
        assert_eq!(keys(e), vec!["upstream.require_key"]);
        let e = load("[upstream]\nrequire_key = true\napi_key_env = \"\"\n").unwrap_err();
        assert_eq!(keys(e), vec!["upstream.require_key"]);
        let key = |n: &str| (n == "CHUTES_API_KEY").then(|| "cpk_x".to_string());
        let c = Config::from_toml(
            "[upstream]\nrequire_key = true\n",
            &Overrides::default(),
            &key,
        )
        .unwrap();
        assert!(c.upstream.require_key && c.upstream.api_key.is_some());
        // One error for one problem: an empty variable under require_key is not reported twice.
        let e = Config::from_toml(
            "[upstream]\nrequire_key = true\n",
            &Overrides::default(),
            &empty,
        )
        .unwrap_err();
        assert_eq!(keys(e), vec!["upstream.api_key_env"]);
    }

    /// Issue 18, item 2: a state path that cannot be written is found at load (so by `--check`
    /// too), not at the first request, which would wait for a reservation that never lands.
    #[test]
    fn an_unwritable_state_path_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("state.json");
        let c = load(&format!("[state]\npath = {:?}\n", ok.display().to_string())).unwrap();
        assert_eq!(c.state.path.as_deref(), Some(ok.as_path()));
        // The probe leaves nothing behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let missing = dir.path().join("no-such-dir").join("state.json");
        let unwritable = std::path::PathBuf::from("/proc/chutes-proxy-state.json");
        for bad in [missing, unwritable, dir.path().to_path_buf()] {
            let e = load(&format!(
                "[state]\npath = {:?}\n",
                bad.display().to_string()
            ))
            .unwrap_err();
            assert_eq!(keys(e.clone()), vec!["state.path"], "{}", bad.display());
            assert!(!e.0[0].message.is_empty());
        }
    }

    /// Issue 18, item 12: `--check` prints a config that loads back to the same one; the key
    /// shows only as where it comes from.
    #[test]
    fn check_output_loads_back_to_the_same_config() {
        let dir = tempfile::tempdir().unwrap();
        let keyfile = dir.path().join("api key");
        std::fs::write(&keyfile, "cpk_from_file_SECRET\n").unwrap();
        let state = dir.path().join("st\u{e9}te \"x\".json");
        let env = |n: &str| match n {
            "CHUTES_API_KEY" => Some("cpk_env_SECRET".to_string()),
            "BOT_TOKEN" => Some("tok_SECRET".to_string()),
            _ => None,
        };
        let texts = [
            String::new(),
            include_str!("../config.toml").to_string(),
            format!(
                r#"
                [server]
                listen = "127.0.0.1:18080"
                admin_listen = ""
                max_request_body = "1MiB"
                [upstream]
                url = "http://127.0.0.1:3000/prefix/"
                api_key_file = {:?}
                require_key = true
                auth_header = "x-api-key"
                auth_prefix = ""
                tls_roots = "native"
                [limits]
                requests_per_minute = 30
                requests_per_day = 300
                day_reset_utc = "07:30"
                [queue]
                max_wait = "1500ms"
                [cooldown]
                multiplier = 1.5
                [state]
                path = {:?}
                [shared_state]
                backend = "redis"
                redis_url = "redis://:pw@cache:6379/0"
                [clients]
                require_token = true
                [[clients.client]]
                name = "bot"
                token_env = "BOT_TOKEN"
                requests_per_minute = 60
                requests_per_day = 100
                max_wait = "1s"
                "#,
                keyfile.display().to_string(),
                state.display().to_string()
            ),
        ];
        for text in texts {
            let first = Config::from_toml(&text, &Overrides::default(), &env).unwrap();
            let rendered = first.render();
            for secret in ["SECRET", ":pw@"] {
                assert!(!rendered.contains(secret), "{secret} in\n{rendered}");
            }
            let second = Config::from_toml(&rendered, &Overrides::default(), &env)
                .unwrap_or_else(|e| panic!("{e}\n---\n{rendered}"));
            assert_eq!(second.render(), rendered);
            // The same configuration, not only the same text: the key still comes from the
            // same place and is the same key.
            assert_eq!(
                format!("{first:?}"),
                format!("{second:?}").replace("<redacted>@cache", ":pw@cache")
            );
            assert_eq!(
                first
                    .upstream
                    .api_key
                    .as_ref()
                    .map(|k| k.expose().to_string()),
                second
                    .upstream
                    .api_key
                    .as_ref()
                    .map(|k| k.expose().to_string())
            );
        }
    }

    #[test]
    fn clients_are_validated() {
        let env = |n: &str| (n == "BOT_TOKEN").then(|| "tok".to_string());
        let c = Config::from_toml(
            r#"
            [[clients.client]]
            name = "bot"
            token_env = "BOT_TOKEN"
            weight = 3
            requests_per_minute = 10
            "#,
            &Overrides::default(),
            &env,
        )
        .unwrap();
        assert_eq!(c.clients.clients[0].weight.get(), 3);
        let e = Config::from_toml(
            r#"
            [[clients.client]]
            name = "default"
            [[clients.client]]
            name = "x"
            token_env = "MISSING"
            max_wait = "1h"
            colour = 1
            "#,
            &Overrides::default(),
            &env,
        )
        .unwrap_err();
        let k = keys(e);
        assert!(k.contains(&"clients.client[0].name".to_string()));
        assert!(k.contains(&"clients.client[1].token_env".to_string()));
        assert!(k.contains(&"clients.client[1].max_wait".to_string()));
        assert!(k.contains(&"clients.client[1].colour".to_string()));
    }

    #[test]
    fn tls_roots_are_chosen_or_refused() {
        assert_eq!(load("").unwrap().upstream.tls_roots, TlsRoots::Webpki);
        let c = load("[upstream]\ntls_roots = \"native\"\n").unwrap();
        assert_eq!(c.upstream.tls_roots, TlsRoots::Native);
        assert!(c.render().contains("tls_roots = \"native\""));
        let e = load("[upstream]\ntls_roots = \"system\"\n").unwrap_err();
        assert_eq!(keys(e), vec!["upstream.tls_roots"]);
    }

    #[test]
    fn http2_is_off_unless_asked_for() {
        let c = load("").unwrap();
        assert!(!c.upstream.http2);
        assert!(c.render().contains("http2 = false"));
        let c = load("[upstream]\nhttp2 = true\n").unwrap();
        assert!(c.upstream.http2);
        assert!(c.render().contains("http2 = true"));
        let e = load("[upstream]\nhttp2 = \"yes\"\n").unwrap_err();
        assert_eq!(keys(e), vec!["upstream.http2"]);
    }

    #[test]
    fn absurd_durations_are_refused() {
        let e = load("[queue]\nmax_wait = \"99999999999h\"\n[upstream]\nidle_timeout = \"400d\"\n")
            .unwrap_err();
        assert_eq!(keys(e), vec!["upstream.idle_timeout", "queue.max_wait"]);
    }

    #[test]
    fn redis_passwords_never_show_in_check_output() {
        let c = load(
            "[shared_state]\nbackend = \"redis\"\nredis_url = \"redis://:s3cr@t-pw@cache:6379/0\"\n",
        )
        .unwrap();
        let out = c.render();
        assert!(out.contains("redis://<redacted>@cache:6379/0"), "{out}");
        assert!(!out.contains("s3cr") && !out.contains("t-pw"), "{out}");
        let c = load("[shared_state]\nbackend = \"redis\"\nglobal_concurrency = true\n").unwrap();
        assert!(c.shared_state.global_concurrency);
    }

    #[test]
    fn the_shipped_config_file_is_valid_and_complete() {
        let text = include_str!("../config.toml");
        let c = load(text).expect("config.toml must be valid");
        assert_eq!(c.limits.requests_per_minute.get(), 50);
        // Every key the canonical rendering has (each one the code accepts) is in the file
        // users copy, in its table.
        let keys_of = |t: &str| -> std::collections::BTreeSet<String> {
            let mut table = String::new();
            let mut out = std::collections::BTreeSet::new();
            for line in t.lines().map(str::trim) {
                if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
                    table = name.to_string();
                } else if let Some((k, _)) = line.split_once('=') {
                    let k = k.trim();
                    if !k.is_empty() && !k.starts_with('#') && !k.starts_with('"') {
                        out.insert(format!("{table}.{k}"));
                    }
                }
            }
            out
        };
        let shipped = keys_of(text);
        let missing: Vec<String> = keys_of(&load("").unwrap().render())
            .into_iter()
            .filter(|k| !shipped.contains(k))
            .collect();
        assert!(missing.is_empty(), "config.toml lacks {missing:?}");
    }
}
