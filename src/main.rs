//! The `chutes-proxy` binary: command line, logging, listeners, signals. Everything else is
//! in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use chutes_proxy::clock::WallClock;
use chutes_proxy::config::{Config, Overrides, ProcessEnv};
use chutes_proxy::log::Style;
use chutes_proxy::logbuf::Batched;
use tracing_subscriber::util::SubscriberInitExt as _;

#[derive(Parser, Debug)]
#[command(name = "chutes-proxy", version, about = "Rate-limiting reverse proxy for one Chutes account", long_about = None)]
struct Cli {
    /// Config file (default: ./config.toml if it exists, else built-in defaults).
    #[arg(long, env = "CHUTES_PROXY_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address to serve the proxy on (overrides server.listen).
    #[arg(long, env = "CHUTES_PROXY_LISTEN")]
    listen: Option<String>,
    /// Address for /healthz, /status, /metrics; "" disables (overrides server.admin_listen).
    #[arg(long, env = "CHUTES_PROXY_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// Upstream base URL (overrides upstream.url).
    #[arg(long, env = "CHUTES_PROXY_UPSTREAM")]
    upstream: Option<String>,
    /// Validate the configuration, print it (API key redacted) and exit.
    #[arg(long)]
    check: bool,
    /// Log format on stderr.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "CHUTES_PROXY_LOG_FORMAT",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print a human summary of a running proxy's /status.
    Status {
        /// Admin base URL of the proxy [default: CHUTES_PROXY_ADMIN_LISTEN, else the config
        /// file's server.admin_listen, else http://127.0.0.1:9090].
        #[arg(long)]
        admin: Option<String>,
        /// Print the raw /status JSON instead.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Writes out the batched log lines when `main` ends, whichever way it ends.
struct LogGuard(Batched<std::io::Stderr>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.0.finish();
    }
}

fn init_logging(format: LogFormat) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal that shows them: in a file or a log
    // shipper they are noise (https://no-color.org: NO_COLOR set and non-empty turns them off
    // too, and so does TERM=dumb).
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
        || std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && !no_color;
    // Lines are batched (logbuf.rs): one write per batch instead of one per request. A panic
    // writes out the lines before it first, then its own message.
    let batched = Batched::new(std::io::stderr());
    let for_panics = batched.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        for_panics.flush();
        previous(info);
    }));
    let style = match format {
        LogFormat::Json => Style::Json,
        LogFormat::Text if ansi => Style::Coloured,
        LogFormat::Text => Style::Plain,
    };
    chutes_proxy::log::dispatch(style, filter, &batched).init();
    LogGuard(batched)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Single-threaded: this thread is the proxy's shard 0, and `run_sharded` starts a thread
    // with a runtime of its own for each other core (see `server`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chutes-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (path, explicit) = match &cli.config {
        Some(p) => (Some(p.clone()), true),
        None => (Some(PathBuf::from("config.toml")), false),
    };
    if let Some(Command::Status { admin, json }) = &cli.command {
        let admin = match chutes_proxy::status_cmd::admin_address(
            admin.as_deref(),
            cli.admin_listen.as_deref(),
            path.as_deref().map(|p| (p, explicit)),
        ) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("chutes-proxy status: {e}");
                return ExitCode::FAILURE;
            }
        };
        return runtime.block_on(chutes_proxy::status_cmd::run(&admin, *json));
    }
    let overrides = Overrides {
        listen: cli.listen.clone(),
        admin_listen: cli.admin_listen.clone(),
        upstream: cli.upstream.clone(),
    };
    // SIGHUP's default action ends the process, and reading the configuration can block (a key
    // file on a slow mount, a pipe): take it over before that. A SIGHUP that arrives while the
    // proxy starts is kept and re-reads the file once it serves, so a change made meanwhile is
    // not missed.
    if !cli.check {
        let _in = runtime.enter();
        chutes_proxy::take_over_hangup();
    }
    let config = match Config::load(path.as_deref(), explicit, &overrides, &ProcessEnv) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("chutes-proxy: invalid configuration:");
            for e in &errors.0 {
                // A TOML syntax error spans lines (the source line and a caret): keep them
                // under the first, indented alike.
                eprintln!("  {}", e.to_string().replace('\n', "\n  "));
            }
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!(
            "# configuration OK{}",
            match (&path, explicit) {
                (Some(p), true) => format!(" ({})", p.display()),
                (Some(p), false) if p.exists() => format!(" ({})", p.display()),
                _ => " (built-in defaults)".to_string(),
            }
        );
        // Comments, so the output stays a config file that loads back.
        for w in &config.warnings {
            println!("# warning: {w}");
        }
        print!("{}", config.render());
        return ExitCode::SUCCESS;
    }
    // Held to the end of `main`: its drop writes out the last lines.
    let _log = init_logging(cli.log_format);
    let code = runtime.block_on(async move {
        let (main, admin) = match chutes_proxy::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let source = chutes_proxy::reload::Source {
            path: path.clone(),
            explicit,
            overrides: overrides.clone(),
            env: Box::new(ProcessEnv),
        };
        match chutes_proxy::run_sharded(
            config,
            Some(source),
            main,
            admin,
            WallClock::System,
            shutdown_signal(),
            chutes_proxy::server::shard_count(),
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    });
    // A reload still reading a config that never arrives (a pipe, a hung mount) is on a
    // blocking thread; the runtime would wait for it without end.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, before the
/// proxy starts and says it is listening, not when the future is first polled (after the
/// listeners are serving): a SIGTERM in between would otherwise meet the default action and
/// end the process without the drain and the state save (seen as
/// `hostile::sighup_reloads_and_never_ends_the_process` ending on signal 15 under load).
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let signals = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    );
    async move {
        match signals {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
