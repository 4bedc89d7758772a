//! Fuzz target: `model::wildcard_match` against a plain dynamic-programming reference.
//!
//! The input is split at its first 0 byte into a pattern and a name (each lossy UTF-8, so
//! multi-byte characters and U+FFFD appear). The fast greedy matcher must agree with the
//! reference on every input and never panic. Lengths are capped so the O(n·m) reference
//! stays fast enough for many executions per second.
#![no_main]

use chutes_proxy::model::wildcard_match;
use libfuzzer_sys::fuzz_target;

/// `matches[i][j]`: pattern[..i] matches name[..j]; over bytes, like the real one.
fn reference(p: &[u8], n: &[u8]) -> bool {
    let mut prev = vec![false; n.len() + 1];
    prev[0] = true;
    for &c in p {
        let mut cur = vec![false; n.len() + 1];
        if c == b'*' {
            cur[0] = prev[0];
            for j in 1..=n.len() {
                cur[j] = prev[j] || cur[j - 1];
            }
        } else {
            for j in 1..=n.len() {
                cur[j] = prev[j - 1] && n[j - 1] == c;
            }
        }
        prev = cur;
    }
    prev[n.len()]
}

fuzz_target!(|data: &[u8]| {
    let (p, n) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let p = String::from_utf8_lossy(&p[..p.len().min(512)]);
    let n = String::from_utf8_lossy(&n[..n.len().min(512)]);
    assert_eq!(
        wildcard_match(&p, &n),
        reference(p.as_bytes(), n.as_bytes()),
        "{p:?} vs {n:?}"
    );
});
