//! Who is calling: attribution of a request to a configured client, in the contract's order
//! (a client token sent as the API key, else an `x-proxy-client` naming a configured client
//! that has no token, else `default`).
//!
//! Tokens are compared in constant time and against every configured token, so neither the
//! timing nor the order reveals a near miss. A matched token is never forwarded upstream: the
//! proxy strips it (and puts the account key in its place when one is configured). Not here:
//! the per-client caps and fair shares, which admission enforces.

use http::header::{HeaderMap, AUTHORIZATION};

use crate::admission::ClientId;
use crate::config::ClientsConfig;
use crate::upstream::CLIENT_HEADER;

pub struct Clients {
    /// (token bytes, client id) for clients that have a token.
    tokens: Vec<(Vec<u8>, ClientId)>,
    /// Names of clients without a token, selectable by `x-proxy-client`.
    by_name: Vec<(String, ClientId)>,
    require_token: bool,
}

/// The result of attribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ident {
    pub client: ClientId,
    /// `clients.require_token` is on and no known token was presented.
    pub unauthorized: bool,
    /// The request carried a client token, which must not reach the upstream.
    pub strip_auth: bool,
}

impl Clients {
    /// Client ids follow the configured order, starting at 1 (0 is `default`).
    pub fn new(cfg: &ClientsConfig) -> Clients {
        let mut tokens = Vec::new();
        let mut by_name = Vec::new();
        for (i, c) in cfg.clients.iter().enumerate() {
            match &c.token {
                Some(t) => tokens.push((t.expose().as_bytes().to_vec(), i + 1)),
                None => by_name.push((c.name.clone(), i + 1)),
            }
        }
        Clients {
            tokens,
            by_name,
            require_token: cfg.require_token,
        }
    }

    pub fn identify(&self, headers: &HeaderMap) -> Ident {
        let presented = presented_key(headers);
        let mut found = None;
        if let Some(key) = presented {
            for (token, id) in &self.tokens {
                // No early exit: every token is compared whatever matched.
                if constant_time_eq(token, key) && found.is_none() {
                    found = Some(*id);
                }
            }
        }
        if let Some(client) = found {
            return Ident {
                client,
                unauthorized: false,
                strip_auth: true,
            };
        }
        if self.require_token {
            return Ident {
                client: 0,
                unauthorized: true,
                strip_auth: false,
            };
        }
        let named = headers
            .get(CLIENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|n| {
                let n = n.trim();
                self.by_name
                    .iter()
                    .find(|(name, _)| name == n)
                    .map(|(_, id)| *id)
            });
        Ident {
            client: named.unwrap_or(0),
            unauthorized: false,
            strip_auth: false,
        }
    }
}

/// The API key a client sent: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(AUTHORIZATION) {
        let b = v.as_bytes();
        if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(trim(&b[7..]));
        }
    }
    headers.get("x-api-key").map(|v| trim(v.as_bytes()))
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Equal-length comparison without data-dependent branches; lengths are not secret.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn clients(require: bool) -> Clients {
        let env = |n: &str| match n {
            "BOT" => Some("tok-bot".to_string()),
            "BATCH" => Some("tok-batch".to_string()),
            _ => None,
        };
        // With require_token every configured client must have a token (config refuses one
        // without), so `batch` gets one then.
        let batch_token = if require {
            "token_env = \"BATCH\"\n"
        } else {
            ""
        };
        let text = format!(
            "[clients]\nrequire_token = {require}\n[[clients.client]]\nname = \"bot\"\ntoken_env = \"BOT\"\n[[clients.client]]\nname = \"batch\"\n{batch_token}"
        );
        let c = Config::from_toml(&text, &Overrides::default(), &env).unwrap();
        Clients::new(&c.clients)
    }

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn attribution_order() {
        let c = clients(false);
        assert_eq!(
            c.identify(&h(&[("authorization", "Bearer tok-bot")]))
                .client,
            1
        );
        assert!(
            c.identify(&h(&[("authorization", "bearer tok-bot")]))
                .strip_auth
        );
        assert_eq!(c.identify(&h(&[("x-api-key", "tok-bot")])).client, 1);
        // A token wins over a name.
        assert_eq!(
            c.identify(&h(&[("x-api-key", "tok-bot"), ("x-proxy-client", "batch")]))
                .client,
            1
        );
        assert_eq!(c.identify(&h(&[("x-proxy-client", "batch")])).client, 2);
        // A client with a token cannot be claimed by name.
        assert_eq!(c.identify(&h(&[("x-proxy-client", "bot")])).client, 0);
        assert_eq!(
            c.identify(&h(&[("authorization", "Bearer nope")])).client,
            0
        );
        assert!(
            !c.identify(&h(&[("authorization", "Bearer nope")]))
                .strip_auth
        );
    }

    #[test]
    fn require_token_refuses_everyone_else() {
        let c = clients(true);
        assert!(c.identify(&h(&[])).unauthorized);
        assert!(c.identify(&h(&[("x-proxy-client", "batch")])).unauthorized);
        assert!(
            !c.identify(&h(&[("authorization", "Bearer tok-bot")]))
                .unauthorized
        );
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
