//! Fuzz target: every reader of upstream and client bodies added for Chutes' signals:
//! `signals::classify_429`, `signals::classify_402` (and `quota_exceeded`, its view),
//! `signals::quota_usage` and `model::request_model`, all fed the bytes verbatim.
//!
//! Never panics, and the documented bounds hold: a reset instant is finite, usage figures
//! are at most ten million, a model name is non-empty and at most `MAX_MODEL_LEN` bytes.
//! `request_model`'s scanner gives what serde_json's reading of the same bytes gives
//! (`model::check_model`). Not checked here: that the classification is *right* (the unit
//! tables say what is).
#![no_main]

use chutes_proxy::model::{check_model, request_model, MAX_MODEL_LEN};
use chutes_proxy::signals::{
    classify_402, classify_429, quota_exceeded, quota_usage, Kind402, MAX_QUOTA_FIGURE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = classify_429(data);
    let kind = classify_402(data);
    if let Kind402::DailyQuota {
        reset_unix: Some(t),
    } = kind
    {
        assert!(t.is_finite(), "reset {t}");
    }
    // quota_exceeded is exactly classify_402's DailyQuota.
    let quota = quota_exceeded(data).map(|q| q.reset_unix);
    let daily = match kind {
        Kind402::DailyQuota { reset_unix } => Some(reset_unix),
        _ => None,
    };
    assert_eq!(quota, daily);
    if let Some((q, u)) = quota_usage(data) {
        assert!(q <= MAX_QUOTA_FIGURE && u <= MAX_QUOTA_FIGURE, "{q} {u}");
    }
    if let Some(m) = request_model(data) {
        assert!(!m.is_empty() && m.len() <= MAX_MODEL_LEN, "{m:?}");
    }
    check_model(data);
});
