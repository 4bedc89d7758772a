//! Fuzz target: the SSE error-line rewriter on arbitrary streams cut into arbitrary chunks.
//!
//! Invariants checked, each a promise in `src/sse.rs`:
//! - it never panics;
//! - the output does not depend on how the stream was split into chunks (one chunk, the
//!   fuzzer's split points, or one byte at a time give the same bytes);
//! - a stream with no line starting with '{' passes through byte for byte and no error is
//!   reported: the rewriter only ever touches lines that could be Chutes' raw error lines.
//!
//! Input layout: the first byte is the number of split points (mod 8), the next that many
//! bytes are split positions (scaled to the stream), the rest is the stream.
#![no_main]

use bytes::Bytes;
use chutes_proxy::sse::SseErrorRewriter;
use libfuzzer_sys::fuzz_target;

/// Feeds `chunks` through a fresh rewriter; returns the whole output and `saw_error`.
fn run<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, bool) {
    let mut rw = SseErrorRewriter::new();
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&rw.push(Bytes::copy_from_slice(c)));
    }
    if let Some(tail) = rw.finish() {
        out.extend_from_slice(&tail);
    }
    (out, rw.saw_error())
}

/// True if some line (after the start, a '\n' or a '\r') starts with '{'. Treating every CR
/// and LF as a line end over-approximates the rewriter's CRLF rule, which is the safe side
/// for the pass-through check.
fn has_brace_line(stream: &[u8]) -> bool {
    stream.first() == Some(&b'{')
        || stream
            .windows(2)
            .any(|w| (w[0] == b'\n' || w[0] == b'\r') && w[1] == b'{')
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8).min(rest.len());
    let (cuts, stream) = rest.split_at(n);
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) * stream.len() / 256)
        .collect();
    points.sort_unstable();
    points.dedup();

    let (whole, whole_err) = run([stream]);

    let mut pieces = Vec::new();
    let mut start = 0;
    for p in points {
        pieces.push(&stream[start..p]);
        start = p;
    }
    pieces.push(&stream[start..]);
    let (split, split_err) = run(pieces.iter().copied());
    assert_eq!(whole, split, "output depends on chunking");
    assert_eq!(whole_err, split_err);

    if stream.len() <= 4096 {
        let (bytewise, _) = run(stream.chunks(1));
        assert_eq!(whole, bytewise, "output depends on chunking (byte by byte)");
    }

    if !has_brace_line(stream) {
        assert_eq!(whole, stream, "a stream without '{{' lines was changed");
        assert!(!whole_err);
    }
});
