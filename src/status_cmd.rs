//! `chutes-proxy status`: fetch `/status` from a running proxy and print what a person needs
//! at a glance. Placeholder summary; see issue notes.

use std::process::ExitCode;

pub async fn run(admin: &str, json: bool) -> ExitCode {
    let _ = (admin, json);
    ExitCode::FAILURE
}
