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

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// Longest model name tracked; a longer `model` value is treated as no model (the request
/// belongs to the account only), because model names key bounded tables.
pub const MAX_MODEL_LEN: usize = 256;

/// The top-level `"model"` string of a JSON request body, if there is one. Not JSON, not an
/// object, `model` missing / not a string / empty / longer than [`MAX_MODEL_LEN`] → None.
/// A body with `model` twice is None too: which of the two the upstream would read is not
/// ours to guess.
///
/// The body is read once, without building it: the answer is exactly that of serde_json's
/// `from_slice` into a struct of one optional string field, `model` (every other field
/// skipped as `IgnoredAny`), which [`check_model`] holds it to in the unit tests and the
/// `bodies` fuzz target. So the whole body must be JSON (trailing bytes, a bad number or
/// escape, a control character in a string anywhere refuse it), the top-level keys and the
/// model must be UTF-8 with paired surrogates, while skipped strings are checked for their
/// escapes only, as serde_json skips them. Nesting costs no stack (a bit a level) and strings are searched a
/// word at a time: serde_json took 2.9k instructions for the e2e bench's 118-byte body, most
/// of it its visitors (callgrind, BENCHMARKS.md eleventh session).
pub fn request_model(body: &[u8]) -> Option<Arc<str>> {
    let mut s = Scan { b: body, i: 0 };
    s.ws();
    if !s.eat(b'{') {
        return None;
    }
    // `Some(None)`: a `model` that was null, or a string not usable as a name.
    let mut model: Option<Option<Arc<str>>> = None;
    s.ws();
    if !s.eat(b'}') {
        loop {
            if !s.eat(b'"') {
                return None;
            }
            let is_model = s.key()?;
            s.ws();
            if !s.eat(b':') {
                return None;
            }
            s.ws();
            if is_model {
                if model.is_some() {
                    return None;
                }
                model = Some(s.model()?);
            } else {
                s.skip_value()?;
            }
            s.ws();
            match s.next()? {
                b',' => s.ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    s.ws();
    if s.i != body.len() {
        return None;
    }
    model.flatten()
}

/// A reading position in a body. Every method that can fail gives `None` at a byte that is not
/// JSON or at the end.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> bool {
        let here = self.peek() == Some(c);
        self.i += usize::from(here);
        here
    }

    /// JSON's whitespace (serde_json's: space, tab, LF, CR).
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if !self.b[self.i..].starts_with(word) {
            return None;
        }
        self.i += word.len();
        Some(())
    }

    /// Digits from here; how many.
    fn digits(&mut self) -> usize {
        let from = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - from
    }

    /// `-`? (`0` | `[1-9][0-9]*`) (`.` `[0-9]+`)? (`[eE]` `[+-]`? `[0-9]+`)?
    fn skip_number(&mut self) -> Option<()> {
        self.eat(b'-');
        match self.next()? {
            // A digit after a leading zero is not this number's: it is refused as the byte
            // after a value.
            b'0' => {}
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.eat(b'.') && self.digits() == 0 {
            return None;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// Where, from here, the next `"`, `\` or control character is (or the end), a word at a
    /// time: whole prompts are skipped here.
    fn special(&self) -> usize {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = ONES * 0x80;
        let (b, mut i) = (self.b, self.i);
        while let Some(word) = b.get(i..i + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()) {
            let w = u64::from_le_bytes(word);
            let quote = w ^ (ONES * u64::from(b'"'));
            let slash = w ^ (ONES * u64::from(b'\\'));
            // The high bit of each byte that is zero in `quote` or `slash`, or below 0x20 in
            // `w`. A borrow can flag a byte above the first such byte, never one below it,
            // so the lowest flag is the first one.
            let found = (quote.wrapping_sub(ONES) & !quote
                | slash.wrapping_sub(ONES) & !slash
                | w.wrapping_sub(ONES * 0x20) & !w)
                & HIGH;
            if found != 0 {
                return i + (found.trailing_zeros() / 8) as usize;
            }
            i += 8;
        }
        while let Some(&c) = b.get(i) {
            if c == b'"' || c == b'\\' || c < 0x20 {
                break;
            }
            i += 1;
        }
        i
    }

    /// Four hex digits, as a code unit.
    fn hex4(&mut self) -> Option<u16> {
        let digits = self.b.get(self.i..self.i + 4)?;
        self.i += 4;
        let mut n = 0u16;
        for &d in digits {
            n = n << 4 | u16::from(char::from(d).to_digit(16)? as u8);
        }
        Some(n)
    }

    /// The rest of a string after its opening quote, skipped: escapes must be well formed
    /// (any `\uXXXX`, paired or not) and control characters are refused; its bytes are not
    /// checked for UTF-8 (serde_json's `ignore_str`).
    fn skip_string(&mut self) -> Option<()> {
        loop {
            self.i = self.special();
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        self.hex4()?;
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
    }

    /// The rest of a string after its opening quote: its bytes when it has no escape, else
    /// decoded (surrogates paired, as serde_json's `parse_str` wants them), not yet checked
    /// for UTF-8.
    fn string_bytes(&mut self) -> Option<Cow<'a, [u8]>> {
        let from = self.i;
        self.i = self.special();
        match self.next()? {
            b'"' => Some(Cow::Borrowed(&self.b[from..self.i - 1])),
            b'\\' => self
                .escaped(self.b[from..self.i - 1].to_vec())
                .map(Cow::Owned),
            _ => None,
        }
    }

    /// A top-level key, after its opening quote: whether it is `model`. It must be UTF-8,
    /// as serde_json reads a struct's keys whole.
    fn key(&mut self) -> Option<bool> {
        let key = self.string_bytes()?;
        if *key == *b"model" {
            return Some(true);
        }
        (key.is_ascii() || std::str::from_utf8(&key).is_ok()).then_some(false)
    }

    /// A string, after its opening quote: UTF-8, escapes decoded.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        match self.string_bytes()? {
            Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
            Cow::Owned(v) => String::from_utf8(v).ok().map(Cow::Owned),
        }
    }

    /// The rest of a string with escapes, from just past a backslash, after `text`.
    #[cold]
    fn escaped(&mut self, mut text: Vec<u8>) -> Option<Vec<u8>> {
        loop {
            let c = match self.next()? {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => {
                    let n = self.hex4()?;
                    let point = match n {
                        0xD800..=0xDBFF => {
                            self.literal(b"\\u")?;
                            let low = self.hex4()?;
                            if !(0xDC00..=0xDFFF).contains(&low) {
                                return None;
                            }
                            0x1_0000 + ((u32::from(n) - 0xD800) << 10 | (u32::from(low) - 0xDC00))
                        }
                        0xDC00..=0xDFFF => return None,
                        _ => u32::from(n),
                    };
                    char::from_u32(point)?
                }
                _ => return None,
            };
            text.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            let from = self.i;
            self.i = self.special();
            text.extend_from_slice(&self.b[from..self.i]);
            match self.next()? {
                b'"' => return Some(text),
                b'\\' => {}
                _ => return None,
            }
        }
    }

    /// The model's value: `Some(None)` for null or a string that is no usable name; `None`
    /// for any other value.
    fn model(&mut self) -> Option<Option<Arc<str>>> {
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                Some(None)
            }
            b'"' => {
                self.i += 1;
                let name = self.string()?;
                let usable = !name.is_empty() && name.len() <= MAX_MODEL_LEN;
                Some(usable.then(|| Arc::from(&*name)))
            }
            _ => None,
        }
    }

    /// A member's key and colon, from just before the key.
    fn member(&mut self) -> Option<()> {
        self.ws();
        if !self.eat(b'"') {
            return None;
        }
        self.skip_string()?;
        self.ws();
        self.eat(b':').then_some(())
    }

    /// Any value, skipped, nested ones on a bit stack instead of the call stack (serde_json's
    /// `ignore_value`: no depth limit).
    fn skip_value(&mut self) -> Option<()> {
        let mut open = Frames::default();
        loop {
            self.ws();
            match self.peek()? {
                b'n' => self.literal(b"null")?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'-' | b'0'..=b'9' => self.skip_number()?,
                b'"' => {
                    self.i += 1;
                    self.skip_string()?;
                }
                b'[' => {
                    self.i += 1;
                    self.ws();
                    if !self.eat(b']') {
                        open.push(false);
                        continue;
                    }
                }
                b'{' => {
                    self.i += 1;
                    self.ws();
                    if !self.eat(b'}') {
                        open.push(true);
                        self.member()?;
                        continue;
                    }
                }
                _ => return None,
            }
            // A value ended: close what it ended, then on to the next one.
            loop {
                let Some(object) = open.top() else {
                    return Some(());
                };
                self.ws();
                match self.next()? {
                    b',' if object => {
                        self.member()?;
                        break;
                    }
                    b',' => break,
                    b'}' if object => open.pop(),
                    b']' if !object => open.pop(),
                    _ => return None,
                }
            }
        }
    }
}

/// What is open around a skipped value, innermost last: `true` for an object. A bit a level;
/// only nesting past 64 levels allocates.
#[derive(Default)]
struct Frames {
    low: u64,
    depth: usize,
    deep: Vec<bool>,
}

impl Frames {
    fn push(&mut self, object: bool) {
        if self.depth < 64 {
            let bit = 1u64 << self.depth;
            self.low = if object {
                self.low | bit
            } else {
                self.low & !bit
            };
        } else {
            self.deep.push(object);
        }
        self.depth += 1;
    }

    fn top(&self) -> Option<bool> {
        match self.depth {
            0 => None,
            d if d <= 64 => Some(self.low >> (d - 1) & 1 == 1),
            _ => self.deep.last().copied(),
        }
    }

    fn pop(&mut self) {
        if self.depth > 64 {
            self.deep.pop();
        }
        self.depth = self.depth.saturating_sub(1);
    }
}

/// What serde_json reads as the model of `body`: the definition [`request_model`] keeps, and
/// the way the proxy read it before (for [`check_model`] and the `model` bench).
#[doc(hidden)]
pub fn serde_model(body: &[u8]) -> Option<Arc<str>> {
    /// The request body, as far as the proxy cares: every other field is skipped by serde
    /// (through `IgnoredAny`) without being built.
    #[derive(serde::Deserialize)]
    struct Request {
        #[serde(default)]
        model: Option<ModelName>,
    }

    /// A `"model"` string value: `Some` when it is a usable name.
    struct ModelName(Option<Arc<str>>);

    impl<'de> Deserialize<'de> for ModelName {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = ModelName;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a model name")
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<ModelName, E> {
                    let usable = !s.is_empty() && s.len() <= MAX_MODEL_LEN;
                    Ok(ModelName(usable.then(|| Arc::from(s))))
                }
            }
            d.deserialize_str(V)
        }
    }

    // serde reads a struct from a JSON array too (`["m"]`); a request body is an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice::<Request>(body).ok()?.model?.0
}

/// For the unit tests and the `bodies` fuzz target: [`request_model`] against
/// [`serde_model`]. Panics if they differ.
#[doc(hidden)]
pub fn check_model(body: &[u8]) {
    assert_eq!(
        request_model(body),
        serde_model(body),
        "{:?}",
        String::from_utf8_lossy(body)
    );
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
            check_model(body);
        }
    }

    /// The scanner against serde_json on bodies near real ones: every seed, every seed cut
    /// short, and every seed with one byte taken out or replaced by one of the bytes JSON's
    /// grammar turns on.
    #[test]
    fn request_model_reads_every_body_as_serde_json_does() {
        let long_prompt = format!(
            "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\\n\\\"q\\\"\"}}]}}",
            "word ".repeat(50)
        );
        let seeds: &[&[u8]] = &[
            br#"{"model":"bench/model","messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":16,"stream":false}"#,
            br#"{"messages":[],"temperature":0.7,"top_p":1e-3,"n":-0,"x":[1.5E+2,true,null,{}],"model":"Qwen/Qwen3-32B"}"#,
            br#"{"model":"a\/b\u00e9\ud83d\ude00","x":"\ud800","y":{"z":[[],[{}],"\t"]}}"#,
            br#"{"mod\u0065l":"m","\u00e9":1}"#,
            "{\"model\":\"模型\",\"é\":\"ü\"}".as_bytes(),
            b"\r\n { \"model\" : null , \"a\" : [ 1 , 2 ] } \n",
            br#"{"model":"","model2":0}"#,
            br#"{}"#,
            br#"{"model":"m","model":"m"}"#,
            long_prompt.as_bytes(),
        ];
        let specials = [
            b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b' ', b'0', b'1', b'-', b'+', b'.',
            b'e', b'u', b'n', b'd', b'8', 0x00, 0x1f, 0x7f, 0xc3, 0xff,
        ];
        let mut checked = 0;
        for seed in seeds {
            for cut in 0..=seed.len() {
                check_model(&seed[..cut]);
                checked += 1;
            }
            for at in 0..seed.len() {
                let mut body = seed.to_vec();
                body.remove(at);
                check_model(&body);
                for &c in &specials {
                    let mut body = seed.to_vec();
                    body[at] = c;
                    check_model(&body);
                    body.insert(at, c);
                    check_model(&body);
                    checked += 2;
                }
            }
        }
        assert!(checked > 20_000, "{checked}");
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
