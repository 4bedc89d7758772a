//! Rewriting Chutes' raw in-stream error lines into proper SSE events.
//!
//! Owns: a byte-level streaming rewriter. Once a stream has started, Chutes reports an
//! error as a bare line `{"error": ...}` without the `data: ` prefix; SSE parsers treat
//! that as an unknown field and ignore it, so OpenAI SDKs end the stream silently as if
//! it had succeeded. [`SseErrorRewriter`] turns such a line into
//! `data: {"error":{"message":..,"type":"upstream_error","param":null,"code":..}}` followed
//! by a blank line, which the SDKs raise as an error.
//!
//! Does not own: deciding which responses are SSE (the caller wraps only `text/event-stream`
//! bodies), timeouts, metrics, or logging (the caller reads [`SseErrorRewriter::saw_error`]).
//!
//! Everything else passes through byte for byte and without delay: only a line starting
//! with '{' is held, and only until its end of line (or 64 KiB). The output is the same
//! however the input is split into chunks.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::response::OpenAiError;

/// Longest '{' line held back. Real error lines are a few hundred bytes; past this the
/// line is not one of them and holding it would delay (and buffer) an arbitrary stream.
const MAX_HELD_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the first byte of a line.
    LineStart,
    /// Inside an ordinary line: passing through until its end.
    Passing,
    /// Inside a line that starts with '{': accumulating it in `held`.
    Holding,
    /// Inside a '{' line that outgrew `MAX_HELD_LINE`: passing through until its end.
    GaveUp,
}

/// What to do with a '\n' that directly follows a '\r' line ending (the two are one
/// CRLF terminator, and the '\n' must not count as a second, empty line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingLf {
    No,
    /// The CR was passed through, so its LF is too.
    Pass,
    /// The CR ended a rewritten line whose event already carries its own terminator.
    Drop,
}

/// Streaming rewriter of raw `{"error": ...}` lines into SSE `data:` events.
/// Feed every upstream chunk to [`push`](Self::push) and call [`finish`](Self::finish)
/// once at end of stream.
#[derive(Debug)]
pub struct SseErrorRewriter {
    state: State,
    pending_lf: PendingLf,
    /// Whether the last complete line was blank (or nothing has been seen yet), i.e. no
    /// event is half-built downstream. If one is, the rewritten event is preceded by a
    /// blank line so its `data:` does not merge into that event.
    prev_line_blank: bool,
    held: Vec<u8>,
    saw_error: bool,
}

impl Default for SseErrorRewriter {
    fn default() -> Self {
        Self::new()
    }
}

/// Pieces of one `push`'s output, kept as ranges of the input chunk where possible so
/// the common case (nothing held or rewritten) returns the chunk itself.
enum Piece {
    Input(std::ops::Range<usize>),
    Owned(Vec<u8>),
}

struct Output {
    /// The first piece. Nearly every chunk is one run of its own input, passed through whole,
    /// and is answered without allocating a list for it.
    first: Option<Piece>,
    rest: Vec<Piece>,
}

impl Output {
    fn new() -> Output {
        Output {
            first: None,
            rest: Vec::new(),
        }
    }

    fn push(&mut self, piece: Piece) {
        if self.first.is_none() {
            self.first = Some(piece);
        } else {
            self.rest.push(piece);
        }
    }

    /// Adds input bytes `start..end`, extending the previous range when contiguous.
    fn input(&mut self, start: usize, end: usize) {
        if start >= end {
            return;
        }
        if let Some(Piece::Input(last)) = self.rest.last_mut().or(self.first.as_mut()) {
            if last.end == start {
                last.end = end;
                return;
            }
        }
        self.push(Piece::Input(start..end));
    }

    fn owned(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.push(Piece::Owned(bytes));
        }
    }

    fn into_bytes(self, chunk: Bytes) -> Bytes {
        match (&self.first, self.rest.is_empty()) {
            (None, _) if chunk.is_empty() => chunk,
            (None, _) => Bytes::new(),
            (Some(Piece::Input(r)), true) if r.start == 0 && r.end == chunk.len() => chunk,
            (Some(Piece::Input(r)), true) => chunk.slice(r.clone()),
            _ => {
                let pieces = || self.first.iter().chain(&self.rest);
                let len = pieces()
                    .map(|p| match p {
                        Piece::Input(r) => r.len(),
                        Piece::Owned(v) => v.len(),
                    })
                    .fold(0usize, usize::saturating_add);
                let mut out = BytesMut::with_capacity(len);
                for piece in pieces() {
                    match piece {
                        Piece::Input(r) => {
                            out.extend_from_slice(chunk.get(r.clone()).unwrap_or_default())
                        }
                        Piece::Owned(v) => out.extend_from_slice(v),
                    }
                }
                out.freeze()
            }
        }
    }
}

/// If `line` (without its terminator) is a JSON object with an "error" key, the SSE event
/// that replaces it: `data: {...}\n\n`.
fn rewrite_error_line(line: &[u8]) -> Option<Vec<u8>> {
    let Value::Object(mut obj) = serde_json::from_slice::<Value>(line).ok()? else {
        return None;
    };
    let error = obj.remove("error")?;
    let null = Value::Null;
    let (message, code) = match &error {
        Value::String(s) => (s.clone(), &null),
        Value::Object(o) => {
            let message = match o.get("message") {
                Some(Value::String(s)) => s.clone(),
                _ => error.to_string(),
            };
            (message, o.get("code").unwrap_or(&null))
        }
        other => (other.to_string(), &null),
    };
    // The one OpenAI error envelope (response.rs), carrying the upstream's own `code`.
    let json = OpenAiError::new(&message, "upstream_error", code).to_json();
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(&json);
    out.extend_from_slice(b"\n\n");
    Some(out)
}

impl SseErrorRewriter {
    pub fn new() -> Self {
        Self {
            state: State::LineStart,
            pending_lf: PendingLf::No,
            prev_line_blank: true,
            held: Vec::new(),
            saw_error: false,
        }
    }

    /// The rewritten event for the held line, with a separating blank line first when an
    /// event is half-built downstream; `None` if the line is not an error object.
    fn rewrite_held(&mut self) -> Option<Vec<u8>> {
        let event = rewrite_error_line(&self.held)?;
        self.saw_error = true;
        if self.prev_line_blank {
            Some(event)
        } else {
            let mut out = Vec::with_capacity(event.len() + 1);
            out.push(b'\n');
            out.extend_from_slice(&event);
            Some(out)
        }
    }

    /// Feed one upstream chunk; returns the bytes to send downstream now.
    ///
    /// Ordinary SSE bytes (any line not starting with '{') pass through at once and
    /// unchanged; when nothing in the chunk is held or rewritten, the chunk itself is
    /// returned (zero-copy). A line starting with '{' is held until its end of line
    /// (`\n`, `\r\n` or a lone `\r`), then emitted as an SSE error event if it is a JSON
    /// object with an "error" key, or unchanged otherwise. A held line longer than 64 KiB
    /// is emitted unchanged and the rest of it passes through.
    pub fn push(&mut self, chunk: Bytes) -> Bytes {
        let mut out = Output::new();
        let input: &[u8] = &chunk;
        let mut i = 0;
        while let Some(&b) = input.get(i) {
            match self.state {
                State::LineStart => {
                    let pending = std::mem::replace(&mut self.pending_lf, PendingLf::No);
                    match b {
                        // Second half of a CRLF: not a line of its own.
                        b'\n' if pending != PendingLf::No => {
                            if pending == PendingLf::Pass {
                                out.input(i, i + 1);
                            }
                        }
                        b'{' => {
                            self.state = State::Holding;
                            self.held.clear();
                            self.held.push(b);
                        }
                        b'\n' | b'\r' => {
                            out.input(i, i + 1);
                            self.prev_line_blank = true;
                            if b == b'\r' {
                                self.pending_lf = PendingLf::Pass;
                            }
                        }
                        _ => {
                            out.input(i, i + 1);
                            self.state = State::Passing;
                        }
                    }
                    i += 1;
                }
                State::Passing | State::GaveUp => {
                    // Pass the whole run up to and including the end of line at once.
                    let rest = input.get(i..).unwrap_or_default();
                    match memchr::memchr2(b'\n', b'\r', rest) {
                        Some(pos) => {
                            let end = i + pos + 1;
                            out.input(i, end);
                            self.state = State::LineStart;
                            self.prev_line_blank = false;
                            if input.get(end - 1) == Some(&b'\r') {
                                self.pending_lf = PendingLf::Pass;
                            }
                            i = end;
                        }
                        None => {
                            out.input(i, input.len());
                            i = input.len();
                        }
                    }
                }
                State::Holding => {
                    if b == b'\n' || b == b'\r' {
                        match self.rewrite_held() {
                            Some(event) => {
                                out.owned(event);
                                self.prev_line_blank = true;
                                if b == b'\r' {
                                    self.pending_lf = PendingLf::Drop;
                                }
                            }
                            None => {
                                out.owned(std::mem::take(&mut self.held));
                                out.input(i, i + 1);
                                self.prev_line_blank = false;
                                if b == b'\r' {
                                    self.pending_lf = PendingLf::Pass;
                                }
                            }
                        }
                        self.held.clear();
                        self.state = State::LineStart;
                        i += 1;
                    } else if self.held.len() >= MAX_HELD_LINE {
                        // Too long to be an error line: release it and stop holding.
                        out.owned(std::mem::take(&mut self.held));
                        self.state = State::GaveUp;
                        // `i` is not advanced: GaveUp passes this byte on.
                    } else {
                        // Take the run up to the end of line (or the cap) in one go.
                        let room = MAX_HELD_LINE - self.held.len();
                        let rest = input.get(i..).unwrap_or_default();
                        let run = rest
                            .iter()
                            .take(room)
                            .position(|&c| c == b'\n' || c == b'\r')
                            .unwrap_or(rest.len().min(room));
                        self.held
                            .extend_from_slice(rest.get(..run).unwrap_or_default());
                        i += run;
                    }
                }
            }
        }
        out.into_bytes(chunk)
    }

    /// End of stream: flush a held partial line (rewritten if it is an error object, with
    /// the trailing blank line). `None` when nothing is held. Resets the line state, so a
    /// rewriter could in principle be reused.
    pub fn finish(&mut self) -> Option<Bytes> {
        let state = std::mem::replace(&mut self.state, State::LineStart);
        self.pending_lf = PendingLf::No;
        if state != State::Holding || self.held.is_empty() {
            return None;
        }
        let out = match self.rewrite_held() {
            Some(event) => event,
            None => std::mem::take(&mut self.held),
        };
        self.held.clear();
        self.prev_line_blank = true;
        Some(Bytes::from(out))
    }

    /// True once at least one error line has been rewritten (for logs/metrics).
    pub fn saw_error(&self) -> bool {
        self.saw_error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Xorshift;

    /// Runs `chunks` through a fresh rewriter and returns everything it emitted.
    fn run(chunks: &[&[u8]]) -> (Vec<u8>, bool) {
        let mut rw = SseErrorRewriter::new();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&rw.push(Bytes::copy_from_slice(chunk)));
        }
        if let Some(tail) = rw.finish() {
            out.extend_from_slice(&tail);
        }
        (out, rw.saw_error())
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    const EV_PLAIN: &str = "data: {\"error\":{\"message\":\"boom\",\"type\":\"upstream_error\",\"param\":null,\"code\":null}}\n\n";

    #[test]
    fn rewrite_table() {
        let cases: &[(&str, &str, &str, bool)] = &[
            ("empty", "", "", false),
            ("plain data", "data: {\"a\":1}\n\n", "data: {\"a\":1}\n\n", false),
            ("string error", "{\"error\": \"boom\"}\n", EV_PLAIN, true),
            ("string error crlf", "{\"error\": \"boom\"}\r\n", EV_PLAIN, true),
            ("string error lone cr", "{\"error\": \"boom\"}\rdata: x\r", &format!("{EV_PLAIN}data: x\r"), true),
            ("error at eof without newline", "{\"error\": \"boom\"}", EV_PLAIN, true),
            (
                "object error with code",
                "{\"error\": {\"message\": \"too long\", \"code\": 400, \"extra\": true}}\n",
                "data: {\"error\":{\"message\":\"too long\",\"type\":\"upstream_error\",\"param\":null,\"code\":400}}\n\n",
                true,
            ),
            (
                "object error with string code",
                "{\"error\": {\"message\": \"m\", \"code\": \"bad_thing\"}}\n",
                "data: {\"error\":{\"message\":\"m\",\"type\":\"upstream_error\",\"param\":null,\"code\":\"bad_thing\"}}\n\n",
                true,
            ),
            (
                "object error without message",
                "{\"error\": {\"detail\": \"x\"}}\n",
                "data: {\"error\":{\"message\":\"{\\\"detail\\\":\\\"x\\\"}\",\"type\":\"upstream_error\",\"param\":null,\"code\":null}}\n\n",
                true,
            ),
            (
                "numeric error",
                "{\"error\": 500}\n",
                "data: {\"error\":{\"message\":\"500\",\"type\":\"upstream_error\",\"param\":null,\"code\":null}}\n\n",
                true,
            ),
            (
                "message with newline and quotes stays one line",
                "{\"error\": \"a\\nb \\\"c\\\"\"}\n",
                "data: {\"error\":{\"message\":\"a\\nb \\\"c\\\"\",\"type\":\"upstream_error\",\"param\":null,\"code\":null}}\n\n",
                true,
            ),
            ("json without error key", "{\"ok\": true}\n", "{\"ok\": true}\n", false),
            ("invalid json", "{not json\n", "{not json\n", false),
            ("json array", "[{\"error\":1}]\n", "[{\"error\":1}]\n", false),
            ("trailing junk", "{\"error\":\"x\"} junk\n", "{\"error\":\"x\"} junk\n", false),
            ("indented brace passes", " {\"error\":\"x\"}\n", " {\"error\":\"x\"}\n", false),
            ("data-prefixed error passes", "data: {\"error\":\"x\"}\n\n", "data: {\"error\":\"x\"}\n\n", false),
            ("lone brace", "{", "{", false),
            (
                "error after terminated event",
                "data: {\"a\":1}\n\n{\"error\": \"boom\"}\n",
                &format!("data: {{\"a\":1}}\n\n{EV_PLAIN}"),
                true,
            ),
            (
                "error right after an unterminated event gets a separator",
                "data: {\"a\":1}\n{\"error\": \"boom\"}\n",
                &format!("data: {{\"a\":1}}\n\n{EV_PLAIN}"),
                true,
            ),
            (
                "error then done",
                "{\"error\": \"boom\"}\n\ndata: [DONE]\n\n",
                &format!("{EV_PLAIN}\ndata: [DONE]\n\n"),
                true,
            ),
            ("invalid utf8 passes", "da\u{fffd}ta\n", "da\u{fffd}ta\n", false),
        ];
        for (label, input, want, saw) in cases {
            let (out, saw_error) = run(&[input.as_bytes()]);
            assert_eq!(text(&out), *want, "{label}");
            assert_eq!(saw_error, *saw, "{label}");
        }
    }

    /// A representative stream: data lines, comments, CRLF, a raw error in the middle
    /// and an unterminated one at the end.
    const STREAM: &[u8] = b": ping\r\n\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"h\xc3\xa9\"}}]}\n\nevent: x\r\ndata: {\"a\":\"{\"}\r\n\r\n{\"error\": {\"message\": \"upstream died\", \"code\": 502}}\r\n{\"not\":\"error\"}\n\ndata: [DONE]\n\n{\"error\":\"late\"}";

    #[test]
    fn every_split_gives_the_same_output() {
        let (whole, saw) = run(&[STREAM]);
        assert!(saw);
        let expected = [
            &b": ping\r\n\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"h\xc3\xa9\"}}]}\n\nevent: x\r\ndata: {\"a\":\"{\"}\r\n\r\n"[..],
            b"data: {\"error\":{\"message\":\"upstream died\",\"type\":\"upstream_error\",\"param\":null,\"code\":502}}\n\n",
            b"{\"not\":\"error\"}\n\ndata: [DONE]\n\n",
            b"data: {\"error\":{\"message\":\"late\",\"type\":\"upstream_error\",\"param\":null,\"code\":null}}\n\n",
        ]
        .concat();
        assert_eq!(text(&whole), text(&expected));

        for a in 0..=STREAM.len() {
            let (left, right) = STREAM.split_at(a);
            assert_eq!(run(&[left, right]).0, whole, "split at {a}");
            for b in a..=STREAM.len() {
                let (mid, last) = right.split_at(b - a);
                assert_eq!(run(&[left, mid, last]).0, whole, "split at {a},{b}");
            }
        }
        let bytewise: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(run(&bytewise).0, whole);
    }

    #[test]
    fn pass_through_is_zero_copy_and_immediate() {
        let mut rw = SseErrorRewriter::new();
        let chunks: &[&[u8]] = &[
            b"data: {\"a\":",
            b"1}\n\n: keep-alive\r\n\r\n",
            b"data: partial line without newline",
            b"",
        ];
        for chunk in chunks {
            let input = Bytes::copy_from_slice(chunk);
            let out = rw.push(input.clone());
            assert_eq!(out, input);
            assert_eq!(out.as_ptr(), input.as_ptr(), "zero-copy for {chunk:?}");
        }
        assert_eq!(rw.finish(), None);
        assert!(!rw.saw_error());
    }

    #[test]
    fn held_line_is_sliced_not_copied_before_it() {
        let mut rw = SseErrorRewriter::new();
        let input = Bytes::from_static(b"data: x\n\n{\"error\":");
        let out = rw.push(input.clone());
        assert_eq!(&out[..], b"data: x\n\n");
        assert_eq!(out.as_ptr(), input.as_ptr());
        assert_eq!(&rw.push(Bytes::from_static(b"\"boom\"}"))[..], b"");
        assert_eq!(
            &rw.push(Bytes::from_static(b"\ndata: y"))[..],
            format!("{EV_PLAIN}data: y").as_bytes()
        );
        assert!(rw.saw_error());
        assert_eq!(rw.finish(), None);
    }

    #[test]
    fn streams_without_error_lines_are_byte_identical() {
        let streams: &[&[u8]] = &[
            b"data: {\"id\":1}\n\ndata: {\"id\":2}\n\ndata: [DONE]\n\n",
            b": comment\r\nretry: 1000\r\nid: 7\r\nevent: message\r\ndata: x\r\n\r\n",
            b"{\"id\":1}\n{\"id\":2}\r\n{broken\r{}\n",
            b"\n\n\r\n\r\r\n\n",
            b"\xff\xfe\x00{\x00\n{\xff}\n",
        ];
        for stream in streams {
            for split in 0..=stream.len() {
                let (a, b) = stream.split_at(split);
                let (out, saw) = run(&[a, b]);
                assert_eq!(out, *stream, "split {split} of {stream:?}");
                assert!(!saw);
            }
        }
    }

    #[test]
    fn overlong_brace_line_is_released_unchanged() {
        let mut line = b"{\"error\":\"".to_vec();
        line.extend(std::iter::repeat_n(b'x', MAX_HELD_LINE + 10));
        line.extend_from_slice(b"\"}\ndata: after\n\n");
        // Whole, and fed in awkward pieces around the cap: same bytes out, nothing rewritten.
        let (out, saw) = run(&[&line]);
        assert_eq!(out, line);
        assert!(!saw);
        for split in [
            1,
            MAX_HELD_LINE - 1,
            MAX_HELD_LINE,
            MAX_HELD_LINE + 1,
            line.len() - 3,
        ] {
            let (a, b) = line.split_at(split);
            assert_eq!(run(&[a, b]).0, line, "split {split}");
        }
        // While holding, nothing is emitted; once over the cap, bytes flow again.
        let mut rw = SseErrorRewriter::new();
        let first = rw.push(Bytes::copy_from_slice(&line[..MAX_HELD_LINE]));
        assert!(first.is_empty());
        let second = rw.push(Bytes::copy_from_slice(
            &line[MAX_HELD_LINE..MAX_HELD_LINE + 5],
        ));
        assert_eq!(second.len(), MAX_HELD_LINE + 5);
    }

    #[test]
    fn a_line_of_exactly_the_cap_is_still_rewritten() {
        let prefix = b"{\"error\":\"";
        let suffix = b"\"}";
        let fill = MAX_HELD_LINE - prefix.len() - suffix.len();
        let mut line = prefix.to_vec();
        line.extend(std::iter::repeat_n(b'y', fill));
        line.extend_from_slice(suffix);
        assert_eq!(line.len(), MAX_HELD_LINE);
        line.push(b'\n');
        let (out, saw) = run(&[&line]);
        assert!(saw);
        assert!(out.starts_with(b"data: {\"error\":{\"message\":\"yyy"));
        assert!(out.ends_with(b"\n\n"));
    }

    #[test]
    fn finish_is_idempotent_and_rewriter_reusable() {
        let mut rw = SseErrorRewriter::default();
        assert_eq!(rw.finish(), None);
        assert!(rw
            .push(Bytes::from_static(b"{\"error\":\"boom\"}"))
            .is_empty());
        assert_eq!(rw.finish().as_deref(), Some(EV_PLAIN.as_bytes()));
        assert_eq!(rw.finish(), None);
        assert_eq!(&rw.push(Bytes::from_static(b"data: z\n"))[..], b"data: z\n");
        assert!(rw.push(Bytes::from_static(b"{\"x\":1}")).is_empty());
        assert_eq!(rw.finish().as_deref(), Some(&b"{\"x\":1}"[..]));
    }

    #[test]
    fn random_streams_are_split_invariant() {
        let fragments: &[&[u8]] = &[
            b"data: x",
            b"data: {\"a\":1}",
            b"\n",
            b"\r",
            b"\r\n",
            b"{",
            b"}",
            b":",
            b" ",
            b"\xff\xc3",
            b"{\"error\":\"e\"}",
            b"{\"error\":{\"message\":\"m\",\"code\":1}}",
            b"{\"ok\":1}",
        ];
        let mut rng = Xorshift::new();
        for _ in 0..2_000 {
            let mut stream = Vec::new();
            for _ in 0..rng.below(24) {
                stream.extend_from_slice(fragments[rng.below(fragments.len())]);
            }
            let (whole, saw) = run(&[&stream]);
            if !saw {
                assert_eq!(whole, stream, "no rewrite means byte-identical: {stream:?}");
            }
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let (a, b) = rest.split_at(rng.below(rest.len() + 1));
                chunks.push(a);
                rest = b;
            }
            assert_eq!(run(&chunks).0, whole, "{stream:?} as {chunks:?}");
        }
    }
}
