//! Who is calling: attribution of a request to a configured client, in the contract's order
//! (a client token sent as the API key, else an `x-proxy-client` naming a configured client
//! that has no token, else `default`).
//!
//! Tokens are compared in constant time and against every configured token, so neither the
//! timing nor the order reveals a near miss. A matched token is never forwarded upstream: the
//! proxy strips it (and puts the account key in its place when one is configured). Not here:
//! the per-client caps and fair shares, which admission enforces.

use std::sync::Arc;
use std::time::Duration;

use crate::asked::Asked;
use crate::config::{ApiKey, ClientsConfig};

/// A row of the client table. Only [`ClientTable`] gives these out (and [`DEFAULT_CLIENT`],
/// its first row, which every table has), so an id cannot be made from an arbitrary number
/// by accident; per-client state built from the same table is indexed by
/// [`ClientId::index`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(usize);

/// The client every unattributed request belongs to: always the table's first row.
pub const DEFAULT_CLIENT: ClientId = ClientId(0);

impl ClientId {
    /// The row's position in its table, for indexing state built from the table's rows.
    pub fn index(self) -> usize {
        self.0
    }

    /// Row `n`, for tests that drive admission or metrics without attribution.
    #[cfg(test)]
    pub(crate) const fn test_row(n: usize) -> ClientId {
        ClientId(n)
    }
}

/// One client as the budget sees it: its name (log lines, `/status`, metric labels), its fair
/// share and its own caps.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub name: Arc<str>,
    pub weight: u32,
    pub requests_per_minute: Option<u32>,
    pub burst: u32,
    pub requests_per_day: Option<u64>,
    pub max_wait: Option<Duration>,
}

/// Every client, built once from the configuration: `default` first, then the configured ones
/// in file order. A [`ClientId`] is a row of this table and nothing else: attribution returns
/// one, admission indexes its per-client state by it (the table is `Settings::clients`), and
/// metrics label their per-client series from the same rows, so the three cannot disagree on
/// who a number is. It derefs to its rows; its `Debug` shows no token.
#[derive(Debug, Clone)]
pub struct ClientTable {
    rows: Vec<ClientSettings>,
    /// The clients that have a token, with it.
    tokens: Vec<(ApiKey, ClientId)>,
    /// The clients without a token, which `x-proxy-client` may name.
    by_name: Vec<ClientId>,
    require_token: bool,
}

impl ClientTable {
    pub fn new(cfg: &ClientsConfig) -> ClientTable {
        let mut table = ClientTable {
            rows: vec![ClientSettings {
                name: Arc::from("default"),
                weight: cfg.default_weight.get(),
                requests_per_minute: None,
                burst: 1,
                requests_per_day: None,
                max_wait: None,
            }],
            tokens: Vec::new(),
            by_name: Vec::new(),
            require_token: cfg.require_token,
        };
        for c in &cfg.clients {
            let id = table.next_id();
            table.rows.push(ClientSettings {
                name: Arc::from(c.name.as_str()),
                weight: c.weight.get(),
                requests_per_minute: c.requests_per_minute.map(|r| r.get()),
                burst: c.burst.get(),
                requests_per_day: c.requests_per_day.map(|d| d.get()),
                max_wait: c.max_wait,
            });
            match &c.token {
                Some(t) => table.tokens.push((t.clone(), id)),
                None => table.by_name.push(id),
            }
        }
        table
    }

    /// A client without a token, as the next row (tests build their tables this way).
    #[cfg(test)]
    pub fn push(&mut self, c: ClientSettings) -> ClientId {
        let id = self.next_id();
        self.rows.push(c);
        self.by_name.push(id);
        id
    }

    /// The id the next row pushed gets.
    fn next_id(&self) -> ClientId {
        ClientId(self.rows.len())
    }

    /// The row of `id`, or `default`'s for an id this table did not give out.
    pub fn row(&self, id: ClientId) -> &ClientSettings {
        self.rows
            .get(id.index())
            .unwrap_or(&self.rows[DEFAULT_CLIENT.index()])
    }

    /// Whether `id` is a row of this table (an id from a bigger table is not).
    pub fn contains(&self, id: ClientId) -> bool {
        id.index() < self.rows.len()
    }

    /// Every row with its id, in the table's order.
    pub fn ids(&self) -> impl Iterator<Item = (ClientId, &ClientSettings)> + '_ {
        (0..).map(ClientId).zip(&self.rows)
    }

    pub fn identify(&self, asked: &Asked<'_>) -> Ident {
        let presented = presented_key(asked);
        let mut found = None;
        if let Some(key) = presented {
            for (token, id) in &self.tokens {
                // No early exit: every token is compared whatever matched.
                if constant_time_eq(token.expose().as_bytes(), key) && found.is_none() {
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
                client: DEFAULT_CLIENT,
                unauthorized: true,
                strip_auth: false,
            };
        }
        let named = asked.client.and_then(|v| v.to_str().ok()).and_then(|n| {
            let n = n.trim();
            self.by_name
                .iter()
                .copied()
                .find(|&id| &*self.row(id).name == n)
        });
        Ident {
            client: named.unwrap_or(DEFAULT_CLIENT),
            unauthorized: false,
            strip_auth: false,
        }
    }
}

/// Clients without tokens, `rows[0]` being `default` (tests build their tables this way).
#[cfg(test)]
impl From<Vec<ClientSettings>> for ClientTable {
    fn from(rows: Vec<ClientSettings>) -> ClientTable {
        ClientTable {
            by_name: (1..rows.len()).map(ClientId).collect(),
            rows,
            tokens: Vec::new(),
            require_token: false,
        }
    }
}

impl std::ops::Deref for ClientTable {
    type Target = [ClientSettings];
    fn deref(&self) -> &[ClientSettings] {
        &self.rows
    }
}

impl<'a> IntoIterator for &'a ClientTable {
    type Item = &'a ClientSettings;
    type IntoIter = std::slice::Iter<'a, ClientSettings>;
    fn into_iter(self) -> Self::IntoIter {
        self.rows.iter()
    }
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

/// The API key a client sent: `Authorization: Bearer <key>` or `X-API-Key: <key>`.
fn presented_key<'a>(asked: &Asked<'a>) -> Option<&'a [u8]> {
    if let Some(v) = asked.authorization {
        let b = v.as_bytes();
        if b.len() > 7 && b[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(trim(&b[7..]));
        }
    }
    asked.api_key.map(|v| trim(v.as_bytes()))
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

    fn clients(require: bool) -> ClientTable {
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
        ClientTable::new(&c.clients)
    }

    /// Attribution of a request with these headers.
    fn ident(c: &ClientTable, pairs: &[(&str, &str)]) -> Ident {
        c.identify(&Asked::of(&h(pairs)))
    }

    fn h(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut m = http::HeaderMap::new();
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
            ident(&c, &[("authorization", "Bearer tok-bot")]).client,
            ClientId(1)
        );
        assert!(ident(&c, &[("authorization", "bearer tok-bot")]).strip_auth);
        assert_eq!(ident(&c, &[("x-api-key", "tok-bot")]).client, ClientId(1));
        // A token wins over a name.
        assert_eq!(
            ident(&c, &[("x-api-key", "tok-bot"), ("x-proxy-client", "batch")]).client,
            ClientId(1)
        );
        assert_eq!(
            ident(&c, &[("x-proxy-client", "batch")]).client,
            ClientId(2)
        );
        // A client with a token cannot be claimed by name.
        assert_eq!(ident(&c, &[("x-proxy-client", "bot")]).client, ClientId(0));
        assert_eq!(
            ident(&c, &[("authorization", "Bearer nope")]).client,
            ClientId(0)
        );
        assert!(!ident(&c, &[("authorization", "Bearer nope")]).strip_auth);
    }

    #[test]
    fn require_token_refuses_everyone_else() {
        let c = clients(true);
        assert!(ident(&c, &[]).unauthorized);
        assert!(ident(&c, &[("x-proxy-client", "batch")]).unauthorized);
        assert!(!ident(&c, &[("authorization", "Bearer tok-bot")]).unauthorized);
    }

    /// The table is the only source of client ids: an id that attribution gives out names the
    /// same client in admission's state and in the metrics' series.
    #[tokio::test(start_paused = true)]
    async fn one_id_names_one_client_in_attribution_admission_and_metrics() {
        use crate::admission::{Admission, Ask, Settings};
        use crate::metrics::{Format, Metrics};
        let env = |n: &str| (n == "BOT").then(|| "tok-bot".to_string());
        // `batch` before `bot` in the file: ids follow the file, not the kind of client.
        let text = "[[clients.client]]\nname = \"batch\"\n[[clients.client]]\nname = \"bot\"\ntoken_env = \"BOT\"\n[[clients.client]]\nname = \"idle\"\n";
        let c = Config::from_toml(text, &Overrides::default(), &env).unwrap();
        let settings = Settings::from_config(&c);
        let metrics = Metrics::new(&settings.clients, false);
        let admission = Admission::new(
            settings.clone(),
            crate::clock::WallClock::pinned(1_795_478_400.0),
            crate::state::Persisted::default(),
            None,
        );
        let calls: [(&[(&str, &str)], &str); 3] = [
            (&[("authorization", "Bearer tok-bot")], "bot"),
            (&[("x-proxy-client", "batch")], "batch"),
            (&[], "default"),
        ];
        let mut permits = Vec::new();
        for (headers, name) in calls {
            let id = ident(&settings.clients, headers).client;
            assert_eq!(&*settings.clients.row(id).name, name);
            permits.push(admission.admit(Ask::new(id, Duration::ZERO)).await.unwrap());
            metrics.request(id, None);
        }
        let snap = admission.snapshot();
        let names: Vec<&str> = snap.clients.iter().map(|c| &*c.name).collect();
        assert_eq!(names, ["default", "batch", "bot", "idle"]);
        for c in &snap.clients {
            let want = u64::from(c.name.as_ref() != "idle");
            assert_eq!(c.used_today, want, "{}", c.name);
        }
        let scrape = metrics.encode(&snap, Format::Text);
        for (name, n) in [("default", 1), ("batch", 1), ("bot", 1), ("idle", 0)] {
            let series = format!(
                "chutes_proxy_requests_total{{outcome=\"forwarded\",client=\"{name}\"}} {n}\n"
            );
            assert!(scrape.contains(&series), "{series}{scrape}");
            let used = format!("chutes_proxy_client_daily_used{{client=\"{name}\"}} {n}\n");
            assert!(scrape.contains(&used), "{used}{scrape}");
        }
        // An id the table never gave out reads as `default`, never a panic.
        assert_eq!(&*settings.clients.row(ClientId(99)).name, "default");
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
