//! Fuzz target: the state-file loader, and what the proxy does with whatever it accepts.
//!
//! `state::parse` runs on bytes from disk at every start; a file truncated by a full disk or
//! edited by hand must be refused with a message, never crash the proxy. What it accepts must
//! render back to a file that parses to the same state, and must be usable: the admission
//! budget is built from it (as at startup), and its own snapshot renders and parses again.
#![no_main]

use std::sync::OnceLock;

use chutes_proxy::admission::{Admission, Settings};
use chutes_proxy::clock::WallClock;
use chutes_proxy::config::Config;
use chutes_proxy::state::{parse, render};
use libfuzzer_sys::fuzz_target;

/// The admission budget spawns its dispatcher task, so it needs a runtime; one for the run.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("tokio runtime")
    })
}

fn settings() -> &'static Settings {
    static S: OnceLock<Settings> = OnceLock::new();
    S.get_or_init(|| {
        let text = "[limits]\nrequests_per_day = 300\nday_reset_utc = \"05:30\"\n\
                    [[clients.client]]\nname = \"bot\"\nrequests_per_day = 10\n";
        let cfg = Config::from_toml(text, &Default::default(), &|_: &str| -> Option<String> {
            None
        })
        .expect("fuzz settings are valid");
        Settings::from_config(&cfg)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(p) = parse(data) else {
        return;
    };
    for offset in [0u32, 19_800] {
        let bytes = render(&p, offset);
        assert_eq!(parse(&bytes).as_ref(), Ok(&p), "render/parse round trip");
    }
    runtime().block_on(async {
        // Pinned to the day the input names (when it is a sane one), so that its counts and
        // gates are restored rather than discarded as another day's.
        let day_start = p
            .day
            .filter(|d| d.unsigned_abs() < 10_000_000)
            .map_or(1_757_721_600.0, |d| d as f64 * 86_400.0 + 19_800.0 + 1.0);
        let a = Admission::new(
            settings().clone(),
            WallClock::pinned(day_start),
            p.clone(),
            None,
        );
        let snap = a.persisted(true);
        let bytes = render(&snap, 19_800);
        assert_eq!(parse(&bytes).as_ref(), Ok(&snap));
        let _ = a.snapshot();
    });
});
