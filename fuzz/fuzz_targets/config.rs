//! Fuzz target: the configuration loader on arbitrary text.
//!
//! `Config::from_toml` must never panic, whatever the file says: it either returns a typed
//! `Config` or a list of errors. A config it accepts must also survive the `--check` round
//! trip: what `Config::render` prints is valid TOML that loads into the same configuration
//! (people paste `--check` output into files), and rendering that again prints the same text.
//!
//! Inputs naming `api_key_file` are skipped: that key makes the loader read a file by design,
//! and a fuzzer that writes `/dev/zero` or `/dev/stdin` into it would test the filesystem,
//! not the parser (it would block or read without end).
#![no_main]

use chutes_proxy::config::{Config, Overrides};
use libfuzzer_sys::fuzz_target;

/// Every environment variable is set, so client `token_env`s and `api_key_env` always
/// resolve and the validation behind them runs.
fn env(name: &str) -> Option<String> {
    Some(format!("fuzz-value-of-{name}"))
}

/// The render without its comment lines: the key's source is a comment that legitimately
/// changes (the rendered file no longer names a custom `api_key_env`).
fn without_comments(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.contains("api_key_file") {
        return;
    }
    let overrides = Overrides::default();
    let Ok(cfg) = Config::from_toml(text, &overrides, &env) else {
        return;
    };
    let rendered = cfg.render();
    let again = match Config::from_toml(&rendered, &overrides, &env) {
        Ok(c) => c,
        Err(e) => panic!(
            "--check output does not load back:\n{e}\n--- input:\n{text}\n--- rendered:\n{rendered}"
        ),
    };
    let rerendered = again.render();
    assert_eq!(
        without_comments(&rendered),
        without_comments(&rerendered),
        "--check output is not stable\n--- input:\n{text}"
    );
});
