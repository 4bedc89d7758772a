//! Which model a request is for, and matching model names against configured patterns.
//!
//! Owns: picking the top-level `"model"` out of a JSON request body without building the
//! body's tree, the bound on model names (they key tables, and clients choose them), and
//! `*` wildcard matching for `[limits.model_cost]`-style keys.
//!
//! Does not own: reading the body (the proxy does, bounded by `server.max_request_body`),
//! what a model's name means for admission (cooldowns, costs: the admission module's), or
//! any notion of which models exist upstream. No I/O; hostile input gives `None`/`false`,
//! never a panic.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Longest model name tracked; a longer `model` value is treated as no model (the request
/// belongs to the account only), because model names key bounded tables.
pub const MAX_MODEL_LEN: usize = 256;

/// The request body, as far as the proxy cares: every other field is skipped by serde
/// (through `IgnoredAny`) without being built.
#[derive(serde::Deserialize)]
struct Request {
    #[serde(default)]
    model: Option<ModelName>,
}

/// A `"model"` string value: `Some` when it is a usable name, `None` when it is empty or
/// too long. Any other JSON type is a deserialization error, which ends in "no model" too.
struct ModelName(Option<Arc<str>>);

impl<'de> Deserialize<'de> for ModelName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ModelName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a model name")
            }
            // Called with the body's own bytes (no escapes) or serde_json's scratch copy
            // (escapes); either way the only allocation here is the bounded name.
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ModelName, E> {
                let usable = !s.is_empty() && s.len() <= MAX_MODEL_LEN;
                Ok(ModelName(usable.then(|| Arc::from(s))))
            }
        }
        d.deserialize_str(V)
    }
}

/// The top-level `"model"` string of a JSON request body, if there is one. Not JSON, not an
/// object, `model` missing / not a string / empty / longer than [`MAX_MODEL_LEN`] → None.
/// A body with `model` twice is refused by serde as a duplicate field, so it is None too:
/// which of the two the upstream would read is not ours to guess.
pub fn request_model(body: &[u8]) -> Option<Arc<str>> {
    // serde reads a struct from a JSON array too (`["m"]`); a request body is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    let req: Request = serde_json::from_slice(body).ok()?;
    req.model?.0
}

/// `[limits.model_cost]`-style matching: a pattern with `*` wildcards (any run of
/// characters, possibly empty), matched case-sensitively against the whole name; no regex
/// crate. Bytes are compared, which is exact for UTF-8: a literal run can only match at
/// character boundaries.
///
/// The greedy two-pointer algorithm: on a mismatch, the last `*` takes one more byte. At
/// most O(pattern × name) steps, and no recursion, so no input can blow the stack.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0usize, 0usize);
    // Where the last `*` was in the pattern, and where in the name it started matching.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_model_table() {
        let long = format!("{{\"model\":\"{}\"}}", "m".repeat(MAX_MODEL_LEN + 1));
        let longest_name = "m".repeat(MAX_MODEL_LEN);
        let longest = format!("{{\"model\":\"{longest_name}\"}}");
        let padded = format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}],\"model\":\"deepseek-ai/DeepSeek-V3\"}}",
            "x".repeat(4 << 20)
        );
        let deep_other = format!(
            "{{\"model\":\"m\",\"x\":{}1{}}}",
            "[".repeat(100),
            "]".repeat(100)
        );
        let very_deep = format!(
            "{{\"model\":\"m\",\"x\":{}1{}}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let cases: &[(&str, &[u8], Option<&str>)] = &[
            (
                "chat completion",
                br#"{"model":"deepseek-ai/DeepSeek-V3-0324","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
                Some("deepseek-ai/DeepSeek-V3-0324"),
            ),
            (
                "model last",
                br#"{"messages":[],"temperature":0.7,"model":"Qwen/Qwen3-32B"}"#,
                Some("Qwen/Qwen3-32B"),
            ),
            ("escapes", br#"{"model":"a\/b\u00e9"}"#, Some("a/bé")),
            ("unicode", "{\"model\":\"模型\"}".as_bytes(), Some("模型")),
            ("whitespace", b"\r\n { \"model\" : \"m\" } \n", Some("m")),
            (
                "nested model keys are not the model",
                br#"{"x":{"model":"inner"},"model":"outer"}"#,
                Some("outer"),
            ),
            ("longest allowed", longest.as_bytes(), Some(&longest_name)),
            (
                "big body",
                padded.as_bytes(),
                Some("deepseek-ai/DeepSeek-V3"),
            ),
            ("deep other field", deep_other.as_bytes(), Some("m")),
            ("too long", long.as_bytes(), None),
            ("empty name", br#"{"model":""}"#, None),
            ("null", br#"{"model":null}"#, None),
            ("number", br#"{"model":42}"#, None),
            ("object", br#"{"model":{"name":"m"}}"#, None),
            ("missing", br#"{"messages":[]}"#, None),
            ("only nested", br#"{"x":{"model":"inner"}}"#, None),
            ("case matters", br#"{"Model":"m"}"#, None),
            ("duplicate", br#"{"model":"a","model":"b"}"#, None),
            ("array", br#"["model","m"]"#, None),
            ("array of object", br#"[{"model":"m"}]"#, None),
            ("string", br#""model""#, None),
            ("empty", b"", None),
            ("not json", b"model=m", None),
            ("truncated", br#"{"model":"m","messages":["#, None),
            ("trailing junk", br#"{"model":"m"}x"#, None),
            ("bad utf8", b"{\"model\":\"\xff\"}", None),
            ("lone surrogate", br#"{"model":"\ud800"}"#, None),
            // serde_json skips an ignored value with its own stack, not by recursion, so
            // depth elsewhere costs nothing and is no reason to lose the model.
            ("very deep elsewhere", very_deep.as_bytes(), Some("m")),
            ("html", b"<html>{\"model\":\"m\"}</html>", None),
        ];
        for (label, body, want) in cases {
            assert_eq!(request_model(body).as_deref(), *want, "{label}");
        }
    }

    /// The obvious exponential definition, as the reference `wildcard_match` must agree with.
    fn reference(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| reference(rest, &n[i..])),
            Some((c, rest)) => n.first() == Some(c) && reference(rest, &n[1..]),
        }
    }

    #[test]
    fn wildcard_match_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("", "a", false),
            ("*", "", true),
            ("*", "anything at all", true),
            ("**", "", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("exact", "inexact", false),
            ("*-turbo", "gpt-turbo", true),
            ("*-turbo", "-turbo", true),
            ("*-turbo", "gpt-turbo-2", false),
            ("deepseek-ai/*", "deepseek-ai/DeepSeek-V3", true),
            ("deepseek-ai/*", "Deepseek-ai/DeepSeek-V3", false),
            ("*DeepSeek*", "deepseek-ai/DeepSeek-R1", true),
            ("*deepseek*", "Qwen/Qwen3", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbYcZ", false),
            ("a*b*c", "acb", false),
            ("*a*a*a", "aaaa", true),
            ("*ab", "aab", true),
            ("*aab", "aaab", true),
            ("a*", "a", true),
            ("?", "a", false),
            ("a.b", "aXb", false),
            ("模*", "模型", true),
            ("*型", "模型", true),
            ("*\u{e9}", "e\u{301}", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(wildcard_match(p, n), *want, "{p:?} vs {n:?}");
            assert_eq!(
                reference(p.as_bytes(), n.as_bytes()),
                *want,
                "reference {p:?} {n:?}"
            );
        }
        // Every pattern over {a, b, *} up to length 5 against every name over {a, b} up to
        // length 6: the fast version agrees with the reference.
        let words = |alphabet: &[u8], max: usize| {
            let mut all = vec![Vec::new()];
            let mut frontier = vec![Vec::new()];
            for _ in 0..max {
                frontier = frontier
                    .iter()
                    .flat_map(|w: &Vec<u8>| {
                        alphabet.iter().map(move |c| {
                            let mut w = w.clone();
                            w.push(*c);
                            w
                        })
                    })
                    .collect();
                all.extend(frontier.iter().cloned());
            }
            all
        };
        let names = words(b"ab", 6);
        for p in words(b"ab*", 5) {
            for n in &names {
                let (ps, ns) = (
                    std::str::from_utf8(&p).expect("ascii"),
                    std::str::from_utf8(n).expect("ascii"),
                );
                assert_eq!(wildcard_match(ps, ns), reference(&p, n), "{ps:?} {ns:?}");
            }
        }
        // A hostile pattern stays polynomial: this would take forever by backtracking.
        let name = "a".repeat(MAX_MODEL_LEN);
        assert!(!wildcard_match(&format!("{}b", "*a".repeat(100)), &name));
    }
}
