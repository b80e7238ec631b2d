//! The `tandem` command: parses arguments, sets up logging and the runtime,
//! and maps outcomes to exit codes.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tandem::config::Config;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Sidecar proxy that mirrors outbound HTTP calls to a secondary API"
)]
struct Cli {
    /// Tokio worker threads (like Envoy's --concurrency); defaults to the
    /// number of CPUs.
    #[arg(long, global = true, env = "TANDEM_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar proxy. Without --config it runs the embedded default:
    /// outbound on 127.0.0.1:4140, admin on 127.0.0.1:4191, no routes.
    Proxy {
        /// YAML config file.
        #[arg(long, env = "TANDEM_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print the effective config, defaults and
    /// TANDEM_* overrides included.
    Check {
        /// YAML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a primary and a secondary service in-process with the proxy
    /// between them, send traffic and print what each side received.
    Demo {
        /// How long to send traffic, such as 3s.
        #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
        duration: std::time::Duration,
        /// Keep the proxy and its admin endpoint running after the summary,
        /// until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Proxy { config } => {
            let config = match Config::load(config.as_deref()) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("tandem: {error}");
                    return ExitCode::FAILURE;
                }
            };
            tandem::telemetry::init_logging(&config.log);
            run(cli.workers, proxy(config))
        }
        Command::Demo {
            duration,
            keep_running,
        } => run(cli.workers, async move {
            tandem::demo::run(tandem::demo::Options {
                duration,
                keep_running,
            })
            .await
        }),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(Some(path)) {
        Ok(config) => {
            let yaml = serde_yaml_ng::to_string(&config).expect("the config serializes to YAML");
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tandem: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    workers: Option<u16>,
    main: impl std::future::Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    // One worker runs everything on the main thread: no work-stealing
    // scheduler, no cross-thread wake-ups, which is cheaper per request.
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(workers) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(usize::from(workers));
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder
        .enable_all()
        .thread_name("tandem-worker")
        .build()
        .expect("the tokio runtime starts");
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "exiting");
            eprintln!("tandem: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn proxy(config: Config) -> anyhow::Result<()> {
    // The handler is installed before the listeners are bound, so a SIGTERM
    // that arrives as soon as the proxy reports its addresses still drains.
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    let proxy = tandem::proxy::start(config).await?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = interrupt.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
    proxy.shutdown().await;
    Ok(())
}
