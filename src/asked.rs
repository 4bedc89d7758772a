//! What the proxy reads from a client's request head, found in one walk over its headers.
//!
//! The pipeline reads seven headers before admission (the request id, two API key forms, the
//! client's name, its wait limit, the body's type). Looked up one at a time, each is a hash of
//! the name and a probe of the map: seven hashes per request, a measurable share of the
//! proxy's work (BENCHMARKS.md, "twelfth session"). One pass over the entries, matching each
//! name against the seven, finds them all; a request carries a dozen headers or so.
//!
//! The first value of a repeated header is the one taken, as [`http::HeaderMap::get`] gives.

use http::header::{HeaderMap, HeaderValue};

/// The request headers the pipeline acts on; `None` where the request did not send one.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Asked<'a> {
    /// `x-proxy-request-id`: the client's own id for the request.
    pub request_id: Option<&'a HeaderValue>,
    /// `x-request-id`: the id tracing setups commonly send, kept when ours is absent.
    pub x_request_id: Option<&'a HeaderValue>,
    /// `authorization`: a client token or the account key, as `Bearer <key>`.
    pub authorization: Option<&'a HeaderValue>,
    /// `x-api-key`: the other way a key is sent.
    pub api_key: Option<&'a HeaderValue>,
    /// `x-proxy-client`: the configured client the request names itself as.
    pub client: Option<&'a HeaderValue>,
    /// `x-proxy-max-wait`: how long the client will wait in the queue.
    pub max_wait: Option<&'a HeaderValue>,
    /// `content-type`: whether the body is read before admission to learn its model.
    pub content_type: Option<&'a HeaderValue>,
}

impl<'a> Asked<'a> {
    /// One walk over `headers`. Header names are stored lower-case, so a byte comparison
    /// is the case-insensitive one HTTP asks for.
    pub fn of(headers: &'a HeaderMap) -> Asked<'a> {
        let mut asked = Asked::default();
        for (name, value) in headers {
            let slot = match name.as_str() {
                "x-proxy-request-id" => &mut asked.request_id,
                "x-request-id" => &mut asked.x_request_id,
                "authorization" => &mut asked.authorization,
                "x-api-key" => &mut asked.api_key,
                "x-proxy-client" => &mut asked.client,
                "x-proxy-max-wait" => &mut asked.max_wait,
                "content-type" => &mut asked.content_type,
                _ => continue,
            };
            // A map yields a name's values together, the first first.
            if slot.is_none() {
                *slot = Some(value);
            }
        }
        asked
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Xorshift;
    use http::header::HeaderName;

    /// The names in the order of [`fields`].
    const NAMES: [&str; 7] = [
        "x-proxy-request-id",
        "x-request-id",
        "authorization",
        "x-api-key",
        "x-proxy-client",
        "x-proxy-max-wait",
        "content-type",
    ];

    fn fields<'a>(a: &Asked<'a>) -> [Option<&'a HeaderValue>; 7] {
        [
            a.request_id,
            a.x_request_id,
            a.authorization,
            a.api_key,
            a.client,
            a.max_wait,
            a.content_type,
        ]
    }

    /// Against the map's own lookup, on random heads: the seven names, names that share a
    /// prefix or a suffix with them, repeats, and names in upper case (which the map
    /// lower-cases), in random order.
    #[test]
    fn the_walk_finds_what_get_finds() {
        let others = [
            "x-proxy-client-extra",
            "x-api-keys",
            "x-proxy-",
            "accept",
            "user-agent",
            "content-length",
            "X-Proxy-Client",
            "Content-Type",
            "AUTHORIZATION",
            "proxy-authorization",
            "x-request-ids",
        ];
        let mut rng = Xorshift::new();
        let mut found_any = [false; 7];
        for round in 0..2000 {
            let mut map = HeaderMap::new();
            for i in 0..rng.below(24) {
                let name = if rng.below(2) == 0 {
                    NAMES[rng.below(NAMES.len())]
                } else {
                    others[rng.below(others.len())]
                };
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                let value = HeaderValue::from_str(&format!("v{round}-{i}")).unwrap();
                map.append(name, value);
            }
            let walked = fields(&Asked::of(&map));
            let got = NAMES.map(|n| map.get(n));
            assert_eq!(walked, got, "{map:?}");
            for (seen, g) in found_any.iter_mut().zip(got) {
                *seen |= g.is_some();
            }
        }
        // The heads did exercise every field.
        assert_eq!(found_any, [true; 7]);
    }

    #[test]
    fn names_are_the_standard_ones_where_there_is_one() {
        assert_eq!(NAMES[2], http::header::AUTHORIZATION.as_str());
        assert_eq!(NAMES[6], http::header::CONTENT_TYPE.as_str());
        assert_eq!(NAMES[0], crate::response::REQUEST_ID.as_str());
        assert_eq!(NAMES[3], crate::upstream::X_API_KEY.as_str());
        assert_eq!(NAMES[4], crate::upstream::CLIENT_HEADER.as_str());
        assert_eq!(NAMES[5], crate::upstream::MAX_WAIT_HEADER.as_str());
    }

    #[test]
    fn an_empty_head_asks_nothing() {
        assert_eq!(Asked::of(&HeaderMap::new()), Asked::default());
    }
}
