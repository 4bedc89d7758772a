//! Fuzz target: the upstream 402 body parser (`signals::quota_exceeded`) and the error-body
//! excerpt (`signals::body_snippet`), both fed upstream bytes verbatim.
//!
//! Never panics; a reset instant it reports is a finite number; an excerpt is bounded by its
//! limit (plus the replacement characters lossy UTF-8 may add for a cut character).
#![no_main]

use chutes_proxy::signals::{body_snippet, quota_exceeded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(q) = quota_exceeded(data) {
        if let Some(t) = q.reset_unix {
            assert!(
                t.is_finite(),
                "reset {t} from {:?}",
                String::from_utf8_lossy(data)
            );
        }
    }
    for max in [0usize, 7, 2048] {
        let s = body_snippet(data, max);
        // Each input byte becomes at most one U+FFFD (3 bytes).
        assert!(s.len() <= max * 3);
    }
});
