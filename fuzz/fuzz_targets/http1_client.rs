//! Fuzz target: the upstream side of HTTP/1.1 (`src/http1/client.rs`) reading arbitrary bytes
//! as the answer to a request.
//!
//! Beyond "never panics": the answer is read whole and in two reads split where the input's
//! first two bytes say; its head, body, fault and whether the connection could be used again
//! must be the same both ways.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = u16::from_le_bytes([data[0], data[1]]) as usize;
    chutes_proxy::http1::client::check_answer(&data[2..], split);
});
