//! Fuzz target: the proxy's own HTTP/1 request head parser and chunked-body decoder
//! (`src/http1.rs`), on arbitrary bytes.
//!
//! Beyond "never panics": what they make of the bytes does not depend on how the bytes
//! arrive. The input is read whole and in two pieces split where its first two bytes say; the
//! head (its fields, framing and keep-alive, or its refusal) and the decoded body (its data,
//! where it ends, or that it is broken) must be the same both ways.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = u16::from_le_bytes([data[0], data[1]]) as usize;
    chutes_proxy::http1::check_split(&data[2..], split);
});
