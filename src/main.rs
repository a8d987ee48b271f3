use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glibc's malloc costs a measurable share of each proxied request (many
/// small short-lived buffers); mimalloc's thread-local free lists do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use portcullis::config::{Config, LogFormat, CACHE_KEY_ENV};
use portcullis::TlsFiles;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "TLS authentication gateway for Grafana and PMM"
)]
struct Cli {
    /// Config file, which must exist. Without this option ./gateway.toml is
    /// read, and the built-in defaults are used when it does not exist.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config as a start would (the files it names included)
    /// and print the effective settings, passwords hidden.
    Check,
    /// Run the gateway (the default).
    Run,
}

/// The implicit config file, which may be absent.
const DEFAULT_CONFIG: &str = "gateway.toml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = match &cli.config {
        Some(path) => Config::load(path, std::env::vars()).map(|c| (c, path.clone(), true)),
        None => {
            let path = PathBuf::from(DEFAULT_CONFIG);
            Config::load_if_present(&path, std::env::vars()).map(|(c, found)| (c, path, found))
        }
    };
    let (config, path, found) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(2);
        }
    };
    let source = if found {
        path.display().to_string()
    } else {
        format!("the built-in defaults (no ./{DEFAULT_CONFIG})")
    };
    match cli.command {
        Some(Command::Check) => {
            // The same checks as a start, files included; nothing is bound
            // and Redis is not contacted.
            let checked = match portcullis::check(&config, std::env::var(CACHE_KEY_ENV).ok().as_deref()) {
                Ok(checked) => checked,
                Err(e) => {
                    eprintln!("portcullis: {e}");
                    return ExitCode::from(2);
                }
            };
            print!("{}", config.redacted().to_toml());
            if checked.tls == TlsFiles::WillGenerate {
                eprintln!(
                    "portcullis: {} and {} do not exist: the first start writes a self-signed pair there",
                    config.tls.cert.display(),
                    config.tls.key.display()
                );
            }
            eprintln!("portcullis: {source} is valid");
            ExitCode::SUCCESS
        }
        Some(Command::Run) | None => run(config, &source, cli.config),
    }
}

fn run(config: Config, source: &str, named: Option<PathBuf>) -> ExitCode {
    let log_level = init_logging(&config);
    tracing::info!(config = %source, "configuration loaded");
    // One worker: a current-thread runtime skips the work-stealing machinery.
    let mut runtime = if config.server.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if config.server.workers > 1 {
        runtime.worker_threads(config.server.workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portcullis: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let running = match portcullis::start(config, std::env::var(CACHE_KEY_ENV).ok()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("portcullis: {e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_stop(|| reload(&running, named.as_deref(), &log_level)).await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        running.stop().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Waits for SIGTERM or SIGINT; each SIGHUP in between reloads.
async fn wait_for_stop(mut on_hangup: impl FnMut()) {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(mut term), Ok(mut int), Ok(mut hup)) => loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => on_hangup(),
            }
        },
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// SIGHUP: reads the configuration again (the same file and environment as
/// the start) and takes it up, or keeps the one in use when it is invalid.
fn reload(running: &portcullis::Running, named: Option<&std::path::Path>, log_level: &LogLevel) {
    let loaded = match named {
        Some(path) => Config::load(path, std::env::vars()),
        None => {
            Config::load_if_present(std::path::Path::new(DEFAULT_CONFIG), std::env::vars()).map(|(c, _)| c)
        }
    };
    let config = match loaded {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "configuration not reloaded: keeping the one in use");
            return;
        }
    };
    let level = config.log.level.clone();
    match running.reload(config, std::env::var(CACHE_KEY_ENV).ok().as_deref()) {
        Ok(restart) => {
            if let Err(e) = log_level(&level) {
                tracing::warn!(error = %e, "log.level not changed");
            }
            tracing::info!("configuration reloaded: routes, identity, session cookie, trusted proxies, cache TTLs, log level");
            if !restart.is_empty() {
                tracing::warn!(keys = ?restart, "these changed but take effect only after a restart");
            }
        }
        Err(e) => tracing::error!(error = %e, "configuration not reloaded: keeping the one in use"),
    }
}

/// Sets the log filter from a `log.level` value (a reload).
type LogLevel = Box<dyn Fn(&str) -> Result<(), String>>;

/// `log.level`, with rustls' per-connection warnings kept quiet: any client
/// that sends an IP address as SNI (curl, wrk) would flood the log.
fn filter_for(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let level = if level.contains("rustls") {
        level.to_owned()
    } else {
        format!("{level},rustls=error")
    };
    tracing_subscriber::EnvFilter::try_new(&level).map_err(|e| e.to_string())
}

fn init_logging(config: &Config) -> LogLevel {
    let filter = filter_for(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a file or a log collector
        // would get the escape codes as text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A failed write would otherwise be reported with eprintln!, which
        // panics when stderr is a closed pipe (a log collector gone): every
        // later log line, the access log included, would then take its
        // thread down. Lines that cannot be written are dropped.
        .log_internal_errors(false);
    match config.log.format {
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| handle.reload(filter_for(level)?).map_err(|e| e.to_string()))
        }
        LogFormat::Text => {
            let builder = builder.with_env_filter(filter).with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| handle.reload(filter_for(level)?).map_err(|e| e.to_string()))
        }
    }
}
