//! The way out: the connections to the one configured upstream ([`crate::pool`]), the URI
//! rewrite that makes it impossible to reach anywhere else, the header rules (hop-by-hop, key
//! injection), and the first-byte timeout.
//!
//! TLS is rustls on ring with the webpki roots (no OpenSSL, no cmake) and speaks HTTP/1.1,
//! or HTTP/2 when `upstream.http2` lets ALPN choose it; plain `http://` upstreams speak
//! HTTP/1.1 (tests and sidecars). Idle connections expire after `POOL_IDLE_TIMEOUT`.
//!
//! Not here: deciding whether to send (admission) or what a status means (signals, proxy).

use std::future::Future;
use std::time::Duration;

use futures_util::FutureExt as _;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::body::RequestBody;
use crate::config::{TlsRoots, UpstreamConfig, UpstreamUrl};
use crate::pool::Pool;

/// Below the usual 60–120 s idle cut-off of cloud load balancers, so the pool rarely hands out
/// a connection the other side is about to close.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// TCP keepalive on upstream sockets: notices a dead peer under a long silent stream.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Headers that only the proxy reads; never forwarded.
pub const MAX_WAIT_HEADER: HeaderName = HeaderName::from_static("x-proxy-max-wait");
pub const CLIENT_HEADER: HeaderName = HeaderName::from_static("x-proxy-client");
/// The other header a client sends its key in (`Authorization: Bearer` is the first).
pub(crate) const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Why the upstream exchange failed before a response head arrived.
#[derive(Debug)]
pub enum SendError {
    /// Connect refused, DNS failure, TLS failure, reset before the head.
    Unavailable(String),
    /// No response head within `first_byte_timeout`.
    Timeout(Duration),
    /// The client's upload failed (too large, stalled, or the client broke off).
    Upload(String),
}

pub struct Upstream {
    pool: Pool,
    base: UpstreamUrl,
    /// The complete auth header value (prefix + key), marked sensitive so hyper never logs or
    /// HPACK-indexes it.
    auth: Option<HeaderValue>,
    auth_header: HeaderName,
    first_byte_timeout: Duration,
}

impl Upstream {
    /// `shards`: how many server shards will send through it; each keeps its own connections.
    pub fn new(cfg: &UpstreamConfig, shards: usize) -> Result<Upstream, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(TCP_KEEPALIVE));
        // The provider is passed explicitly so that another crypto provider elsewhere in the
        // dependency graph can never make rustls pick one at runtime (and panic).
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let provider = rustls::crypto::ring::default_provider();
        let builder = match cfg.tls_roots {
            TlsRoots::Webpki => builder
                .with_provider_and_webpki_roots(provider)
                .map_err(|e| format!("upstream TLS setup failed: {e}"))?,
            TlsRoots::Native => builder
                .with_provider_and_native_roots(provider)
                .map_err(|e| {
                    format!(
                        "upstream.tls_roots = \"native\": no usable system CA certificates: {e}"
                    )
                })?,
        };
        let pool = Pool::new(
            builder.https_or_http(),
            http,
            cfg.http2,
            &cfg.url,
            POOL_IDLE_TIMEOUT,
            cfg.connect_timeout,
            shards,
        )?;
        let auth = match &cfg.api_key {
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("{}{}", cfg.auth_prefix, key.expose()))
                    .map_err(|_| "upstream.api_key: not a valid header value".to_string())?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Upstream {
            pool,
            base: cfg.url.clone(),
            auth,
            auth_header: cfg.auth_header.clone(),
            first_byte_timeout: cfg.first_byte_timeout,
        })
    }

    pub fn has_key(&self) -> bool {
        self.auth.is_some()
    }

    /// The upstream URI for a request: always the configured scheme and authority, whatever
    /// the request target or `Host` said, with the configured path prefix in front of the
    /// request's path and query.
    pub fn target(&self, uri: &Uri) -> Result<Uri, String> {
        let own = uri.path_and_query();
        let pq = own.map_or("", PathAndQuery::as_str);
        // What goes before the request's own path and query, and that path and query: an
        // authority-form or asterisk-form target has none to forward; an absolute-form one
        // with an empty path and a query (`http://host?q`) forwards `/?q`.
        let (slash, rest) = match pq.as_bytes().first() {
            Some(b'/') => ("", pq),
            Some(b'?') => ("/", pq),
            _ => ("/", ""),
        };
        let prefix = &self.base.path_prefix;
        let full = match own {
            // The request's own, already checked when its head was parsed: shared, not
            // copied and checked again. Not a bare "/": that is also how an empty path reads
            // (`http://host#f`), whose bytes would write an empty HTTP/1.1 request target.
            Some(own) if prefix.is_empty() && slash.is_empty() && rest != "/" => own.clone(),
            _ if prefix.is_empty() && (rest.is_empty() || rest == "/") => {
                PathAndQuery::from_static("/")
            }
            _ => PathAndQuery::try_from(format!("{prefix}{slash}{rest}"))
                .map_err(|e| format!("invalid request path: {e}"))?,
        };
        Uri::builder()
            .scheme(self.base.scheme.clone())
            .authority(self.base.authority.clone())
            .path_and_query(full)
            .build()
            .map_err(|e| format!("invalid request path: {e}"))
    }

    /// Rewrite request headers for the upstream: drop hop-by-hop and proxy-only headers and
    /// `Host` (the client sets it from the URI), and put the account key in place of whatever
    /// credentials the client sent. `strip_client_auth` removes the client's credentials even
    /// without an account key (they were a proxy client token, never meant for the upstream).
    pub fn prepare_headers(&self, headers: &mut HeaderMap, strip_client_auth: bool) {
        strip_hop_by_hop(headers);
        let credentials = self.auth.is_some() || strip_client_auth;
        // Only the names the head has are removed: a removal of an absent name still hashes
        // and probes the map (one pass over the names instead).
        let mut drop = [false; 5];
        for name in headers.keys() {
            if let Some(i) = proxy_only(name) {
                drop[i] = i < 3 || credentials;
            }
        }
        for (name, here) in PROXY_ONLY.iter().zip(drop) {
            if here {
                headers.remove(name);
            }
        }
        if let Some(auth) = &self.auth {
            headers.insert(self.auth_header.clone(), auth.clone());
        }
    }

    /// Send and wait for the response head, at most `first_byte_timeout`; with `keep`, the
    /// request's headers come back beside it, for a retry ([`crate::pool::Pool::send_keeping`]).
    ///
    /// The pool's future mapped, not awaited in an `async fn` of its own: that would keep the
    /// request twice (the argument and the pool's copy) in a future every request in flight
    /// holds.
    pub fn send(
        &self,
        req: Request<RequestBody>,
        keep: bool,
    ) -> impl Future<Output = Result<crate::pool::Sent, SendError>> + Send + '_ {
        let limit = self.first_byte_timeout;
        let deadline = tokio::time::Instant::now() + limit;
        self.pool
            .send_keeping(req, deadline, keep)
            .map(move |sent| match sent {
                Ok(sent) => Ok(sent),
                Err(e) if e.is::<crate::pool::Elapsed>() => Err(SendError::Timeout(limit)),
                Err(e) => Err(classify(&*e)),
            })
    }
}

/// Describe a connect or exchange error without leaking anything sensitive (hyper errors
/// never contain header values), and tell an upload failure from an upstream failure.
fn classify(e: &(dyn std::error::Error + 'static)) -> SendError {
    let mut chain = String::new();
    let mut src = Some(e);
    let mut upload = false;
    while let Some(s) = src {
        if s.downcast_ref::<crate::body::BodyError>().is_some() {
            upload = true;
        }
        if !chain.is_empty() {
            chain.push_str(": ");
        }
        chain.push_str(&s.to_string());
        src = s.source();
    }
    if upload {
        SendError::Upload(chain)
    } else {
        SendError::Unavailable(chain)
    }
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including any named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the head's few names finds which of the nine it has: nearly every head has
    // none, and an HTTP/1.1 upstream's answers have `Connection: keep-alive` alone. Removing
    // each of the nine regardless hashes and probes the map nine times (4% of the proxy's
    // instructions per request, callgrind, BENCHMARKS.md 2026-12-01).
    let mut present = [false; 9];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop(name) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    // `Connection` may name further headers; the usual `keep-alive` (and `close`, when no
    // header of that name is there) names nothing left to remove, and costs no allocation.
    // `Connection: keep-alive`, what an HTTP/1.1 upstream sends, names only a header that is
    // hop-by-hop itself: nothing to parse.
    let usual = || {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .all(|v| v.as_bytes().eq_ignore_ascii_case(b"keep-alive"))
    };
    if present[0] && !usual() {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| hop_by_hop(n).is_none() && headers.contains_key(n))
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for (name, here) in HOP_BY_HOP.iter().zip(present) {
        if here {
            headers.remove(name);
        }
    }
}

/// What `prepare_headers` removes: `Host` (the client sets it from the URI) and the
/// proxy's own request headers always; the client's credentials (the last two) when the
/// account key replaces them or they were a proxy client token.
static PROXY_ONLY: [HeaderName; 5] = [
    header::HOST,
    MAX_WAIT_HEADER,
    CLIENT_HEADER,
    header::AUTHORIZATION,
    X_API_KEY,
];

/// The hop-by-hop headers every proxy drops, whatever `Connection` names (`Connection` first:
/// `strip_hop_by_hop` reads its tokens).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

// Which of a list a name is, by its text: a `const` list of names is built and dropped
// wherever it is used, for each name it is compared with (a tenth of the instructions
// `prepare_headers` and `strip_hop_by_hop` took, callgrind, BENCHMARKS.md eleventh
// session), and comparing with a `static` one does not fold the standard names' compares.

/// Where `name` is in [`HOP_BY_HOP`].
fn hop_by_hop(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

/// Where `name` is in [`PROXY_ONLY`].
fn proxy_only(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "host" => 0,
        "x-proxy-max-wait" => 1,
        "x-proxy-client" => 2,
        "authorization" => 3,
        "x-api-key" => 4,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_upstream_url, Config, Overrides};

    #[test]
    fn the_lists_and_their_lookups_agree() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name), Some(i), "{name}");
            assert_eq!(proxy_only(name), None, "{name}");
        }
        for (i, name) in PROXY_ONLY.iter().enumerate() {
            assert_eq!(proxy_only(name), Some(i), "{name}");
            assert_eq!(hop_by_hop(name), None, "{name}");
        }
        for other in ["content-type", "x-connection", "tee", "date"] {
            let name = HeaderName::from_static(other);
            assert_eq!((hop_by_hop(&name), proxy_only(&name)), (None, None));
        }
    }

    fn upstream(url: &str, key: Option<&str>) -> Upstream {
        let key = key.map(str::to_string);
        let env = move |n: &str| (n == "CHUTES_API_KEY").then(|| key.clone()).flatten();
        let mut cfg = Config::from_toml("", &Overrides::default(), &env).unwrap();
        cfg.upstream.url = parse_upstream_url(url).unwrap();
        Upstream::new(&cfg.upstream, 1).unwrap()
    }

    #[tokio::test]
    async fn target_is_always_the_configured_upstream() {
        // (upstream URL, [(request target, the upstream path and query)]): with a path prefix,
        // and without one, where the request's own path and query are forwarded as they are.
        let tables: [(&str, &[(&str, &str)]); 2] = [
            (
                "http://127.0.0.1:9/prefix",
                &[
                    ("/v1/models?x=1", "/prefix/v1/models?x=1"),
                    ("http://evil.example/v1/x", "/prefix/v1/x"),
                    ("https://evil.example:443/", "/prefix/"),
                    ("*", "/prefix/"),
                    ("evil.example:443", "/prefix/"),
                    ("http://evil.example?q=1", "/prefix/?q=1"),
                    ("http://evil.example#f", "/prefix/"),
                    ("https://evil.example:443", "/prefix/"),
                ],
            ),
            (
                "https://llm.chutes.ai",
                &[
                    ("/v1/models?x=1&y=%20", "/v1/models?x=1&y=%20"),
                    ("/", "/"),
                    ("/v1/chat/completions", "/v1/chat/completions"),
                    ("http://evil.example/v1/x?q", "/v1/x?q"),
                    ("https://evil.example:443", "/"),
                    ("*", "/"),
                    ("evil.example:443", "/"),
                    ("http://evil.example#f", "/"),
                    ("http://evil.example?q=1", "/?q=1"),
                ],
            ),
        ];
        for (base, cases) in tables {
            let u = upstream(base, None);
            let origin = base.trim_end_matches("/prefix");
            for (given, want) in cases {
                let uri: Uri = given.parse().unwrap();
                let target = u.target(&uri).unwrap();
                assert_eq!(target.to_string(), format!("{origin}{want}"), "{given}");
                // What an HTTP/1.1 request line carries (pool.rs): never an empty target.
                let line = Uri::from(target.path_and_query().unwrap().clone());
                assert_eq!(line.to_string(), *want, "{given}");
            }
        }
    }

    #[tokio::test]
    async fn headers_are_rewritten() {
        let u = upstream("https://llm.chutes.ai", Some("cpk_test"));
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("proxy-authorization", "Basic x".parse().unwrap());
        h.insert("host", "evil.example".parse().unwrap());
        h.insert("authorization", "Bearer client".parse().unwrap());
        h.insert("x-api-key", "client".parse().unwrap());
        h.insert("x-proxy-max-wait", "5s".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        u.prepare_headers(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(h["authorization"], "Bearer cpk_test");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h["content-type"], "application/json");
    }

    /// An HTTP/1.1 upstream's `Connection: keep-alive` and the headers a `Connection` names
    /// go; whatever else the response says stays, repeated values included.
    #[test]
    fn hop_by_hop_headers_are_stripped_from_responses() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        h.append("set-cookie", "a=1".parse().unwrap());
        h.append("set-cookie", "b=2".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);

        let mut h = HeaderMap::new();
        h.append("connection", "close, x-hop".parse().unwrap());
        h.append("connection", "X-Other".parse().unwrap());
        h.insert("close", "named by a token".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("x-other", "2".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-kept", "3".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);

        // A usual `keep-alive` beside a value that names a header: that header goes too.
        let mut h = HeaderMap::new();
        h.append("connection", "Keep-Alive".parse().unwrap());
        h.append("connection", "x-hop".parse().unwrap());
        h.insert("x-hop", "1".parse().unwrap());
        h.insert("x-kept", "3".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);

        let mut h = HeaderMap::new();
        h.insert("x-kept", "3".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[tokio::test]
    async fn the_proxys_own_headers_never_go_upstream() {
        let u = upstream("https://llm.chutes.ai", None);
        let mut h = HeaderMap::new();
        h.insert("x-proxy-max-wait", "5s".parse().unwrap());
        h.insert("x-proxy-client", "batch".parse().unwrap());
        h.insert("host", "proxy.local".parse().unwrap());
        h.insert("x-api-key", "client".parse().unwrap());
        u.prepare_headers(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-api-key"]);
    }

    #[tokio::test]
    async fn without_a_key_client_auth_passes_through() {
        let u = upstream("https://llm.chutes.ai", None);
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer client".parse().unwrap());
        u.prepare_headers(&mut h, false);
        assert_eq!(h["authorization"], "Bearer client");
        u.prepare_headers(&mut h, true);
        assert!(h.get("authorization").is_none());
    }
}
