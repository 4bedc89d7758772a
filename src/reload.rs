//! Reload without a restart: re-read the config file (on SIGHUP or `POST /reload`), apply
//! what can change in place, and say what cannot.
//!
//! Owns: loading and validating the new file with the same overrides and environment as at
//! start, the list of changed keys (from the two configurations' canonical renderings, so a
//! new key is covered without touching this file), and handing the new settings to admission
//! and the proxy. Limits, clients' caps and weights, queue, cooldown and retry settings apply
//! at once; admission keeps its queue, the day's counts, cooldowns and the bucket's schedule.
//! Listen addresses, the upstream (URL, TLS, key, timeouts), the state path and the shared
//! state backend need a restart and are reported as such, not applied.
//!
//! Does not own: the signal or the HTTP endpoint (main.rs and admin.rs call [`Reloader::reload`]),
//! or validation rules (config.rs). An invalid file changes nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::admission::{Admission, Settings};
use crate::config::{Config, Env, Overrides};
use crate::proxy::{Live, Proxy};

/// Where the configuration came from, to read it again the same way.
pub struct Source {
    pub path: Option<PathBuf>,
    /// Whether the path was named explicitly (a missing explicit file is an error).
    pub explicit: bool,
    pub overrides: Overrides,
    pub env: Box<dyn Env + Send + Sync>,
}

/// What a successful reload did (the body of `POST /reload`'s 200).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// Keys whose new values are in force now.
    pub applied: Vec<String>,
    /// Keys that changed in the file but keep their old values until a restart.
    pub needs_restart: Vec<String>,
}

/// Key prefixes a reload applies in place.
const LIVE_SECTIONS: [&str; 5] = ["limits.", "queue.", "cooldown.", "retry.", "clients."];

pub struct Reloader {
    source: Option<Source>,
    /// The configuration in force (start-up keys from the first load, live keys from the
    /// last reload).
    current: Mutex<Arc<Config>>,
    admission: Arc<Admission>,
    proxy: Arc<Proxy>,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        source: Option<Source>,
        config: Arc<Config>,
        admission: Arc<Admission>,
        proxy: Arc<Proxy>,
    ) -> Reloader {
        Reloader {
            source,
            current: Mutex::new(config),
            admission,
            proxy,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// [`Reloader::reload`] on a blocking thread. The file is read with blocking I/O, and a
    /// config on a pipe or a hung network mount must hold neither a runtime worker nor, with
    /// it, the shutdown (main gives blocking threads a bounded time at exit).
    /// One at a time, in the order asked: a slow read can never be applied after a newer
    /// one, and repeated requests during a hung read wait here rather than each holding a
    /// blocking thread (which the connector's DNS lookups need too).
    pub async fn reload_blocking(self: &Arc<Self>) -> Result<Report, Vec<String>> {
        let _one = self.one_at_a_time.lock().await;
        let me = Arc::clone(self);
        match tokio::task::spawn_blocking(move || me.reload()).await {
            Ok(r) => r,
            Err(e) => Err(vec![format!("the reload did not complete: {e}")]),
        }
    }

    /// Re-read the file and apply it. `Err` lists every problem, one per key; nothing changed.
    pub fn reload(&self) -> Result<Report, Vec<String>> {
        let Some(src) = &self.source else {
            return Err(vec![
                "this proxy was started without a configuration source to reload".into(),
            ]);
        };
        let new = match Config::load(
            src.path.as_deref(),
            src.explicit,
            &src.overrides,
            src.env.as_ref(),
        ) {
            Ok(c) => c,
            Err(errors) => {
                let lines: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
                for l in &lines {
                    tracing::error!(error = %l, "reload refused: the old configuration stays");
                }
                return Err(lines);
            }
        };
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let (report, merged) = plan(&current, new);
        if !report.applied.is_empty() {
            self.admission.reconfigure(Settings::from_config(&merged));
            self.proxy.set_live(Live::from_config(&merged));
        }
        *current = Arc::new(merged);
        tracing::info!(
            applied = ?report.applied,
            needs_restart = ?report.needs_restart,
            "configuration reloaded"
        );
        Ok(report)
    }
}

/// Compare `old` with `new`: which keys changed, which of those apply in place, and the
/// configuration that results (old start-up keys, new live keys).
pub fn plan(old: &Config, new: Config) -> (Report, Config) {
    let before = keys(&old.render());
    let after = keys(&new.render());
    let mut changed: Vec<String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .chain(after.keys().filter(|k| !before.contains_key(*k)).cloned())
        .collect();
    if old.upstream.api_key != new.upstream.api_key {
        changed.push("upstream.api_key".into());
    }
    changed.sort();
    changed.dedup();
    // A client id is a row of the client table that admission's state and the metrics' series
    // were built from at start, so adding, removing or reordering clients needs a restart;
    // their caps and weights do not.
    let names =
        |c: &Config| -> Vec<String> { c.clients.clients.iter().map(|c| c.name.clone()).collect() };
    let same_clients = names(old) == names(&new);
    let live = |k: &str| {
        LIVE_SECTIONS.iter().any(|p| k.starts_with(p))
            && (same_clients || !k.starts_with("clients."))
    };
    let (applied, needs_restart): (Vec<String>, Vec<String>) =
        changed.into_iter().partition(|k| live(k));
    let mut merged = old.clone();
    merged.limits = new.limits;
    merged.queue = new.queue;
    merged.cooldown = new.cooldown;
    merged.retry = new.retry;
    if same_clients {
        merged.clients = new.clients;
    }
    (
        Report {
            applied,
            needs_restart,
        },
        merged,
    )
}

/// `section.key → value` for every line of a rendered configuration. Repeated client tables
/// are named by the client (`clients.client.<name>.key`), comments are ignored.
fn keys(rendered: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut section = String::new();
    let mut in_client = false;
    for line in rendered.lines() {
        let line = line.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(t) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            section = t.to_string();
            in_client = true;
            continue;
        }
        if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = t.to_string();
            in_client = false;
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if in_client && k == "name" {
            section = format!("clients.client.{}", v.trim_matches('"'));
        }
        out.insert(format!("{section}.{k}"), v.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Config {
        let no_env = |_: &str| None::<String>;
        Config::from_toml(text, &Overrides::default(), &no_env).unwrap()
    }

    #[test]
    fn live_keys_apply_and_startup_keys_wait_for_a_restart() {
        let old = load("[limits]\nrequests_per_minute = 50\n");
        let new = load(
            "[server]\nlisten = \"127.0.0.1:9999\"\n[limits]\nrequests_per_minute = 20\n[queue]\nmax_wait = \"5s\"\n",
        );
        let (r, merged) = plan(&old, new);
        assert_eq!(
            r.applied,
            vec!["limits.requests_per_minute", "queue.max_wait"]
        );
        assert_eq!(r.needs_restart, vec!["server.listen"]);
        assert_eq!(merged.limits.requests_per_minute.get(), 20);
        assert_eq!(merged.server.listen, old.server.listen);
    }

    #[test]
    fn adding_a_client_needs_a_restart_changing_its_caps_does_not() {
        let base = "[[clients.client]]\nname = \"bot\"\nweight = 1\n";
        let old = load(base);
        let (r, merged) = plan(
            &old,
            load("[[clients.client]]\nname = \"bot\"\nweight = 4\n"),
        );
        assert_eq!(r.applied, vec!["clients.client.bot.weight"]);
        assert_eq!(merged.clients.clients[0].weight.get(), 4);
        let (r, merged) = plan(
            &old,
            load(&format!("{base}[[clients.client]]\nname = \"other\"\n")),
        );
        assert!(r.applied.is_empty(), "{r:?}");
        assert!(
            r.needs_restart
                .iter()
                .all(|k| k.starts_with("clients.client.other")),
            "{r:?}"
        );
        assert_eq!(merged.clients.clients.len(), 1);
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let text = "[limits]\nrequests_per_minute = 30\nburst = 2\n";
        let (r, _) = plan(&load(text), load(text));
        assert!(r.applied.is_empty() && r.needs_restart.is_empty(), "{r:?}");
    }
}
