use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glibc's malloc costs a measurable share of each proxied request (many
/// small short-lived buffers); mimalloc's thread-local free lists do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use portcullis::config::{Config, LogFormat, CACHE_KEY_ENV};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "TLS authentication gateway for Grafana and PMM"
)]
struct Cli {
    /// Config file; built-in defaults when it does not exist.
    #[arg(long, short, global = true, default_value = "gateway.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print the effective settings.
    Check,
    /// Run the gateway (the default).
    Run,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Check) => {
            print!("{}", config.to_toml());
            eprintln!("portcullis: {} is valid", cli.config.display());
            ExitCode::SUCCESS
        }
        Some(Command::Run) | None => run(config),
    }
}

fn run(config: Config) -> ExitCode {
    init_logging(&config);
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
        wait_for_signal().await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        running.stop().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_logging(config: &Config) {
    // rustls warns once per connection from clients that send an IP address
    // as SNI (curl, wrk): any client could flood the log that way.
    let level = if config.log.level.contains("rustls") {
        config.log.level.clone()
    } else {
        format!("{},rustls=error", config.log.level)
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}
