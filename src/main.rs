//! The `tandem` command: parses arguments, sets up logging and the runtime,
//! and maps outcomes to exit codes.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tandem::config::Config;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Sidecar proxy that mirrors and fans out outbound HTTP calls to a secondary API"
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
    /// Read or replay the dead-letter spool of fanout routes.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Print the dead-lettered fanout copies, one per line.
    List {
        #[command(flatten)]
        spool: SpoolArgs,
    },
    /// Send the dead-lettered copies again, with their original
    /// idempotency keys. A record is removed once its secondary responds
    /// with 2xx.
    Replay {
        #[command(flatten)]
        spool: SpoolArgs,
        /// Print what would be sent, send nothing and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Timeout of one re-sent request, such as 10s.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(clap::Args)]
struct SpoolArgs {
    /// Spool directory to read. Repeat it for several.
    #[arg(long = "spool-dir", value_name = "DIR")]
    spool_dirs: Vec<PathBuf>,
    /// Config file whose fanout routes name the spool directories, used
    /// when no --spool-dir is given. Replay also trusts its
    /// tls.secondary_trusted_ca.
    #[arg(long, env = "TANDEM_CONFIG")]
    config: Option<PathBuf>,
    /// Only records of this route.
    #[arg(long)]
    route: Option<String>,
    /// Only records dead-lettered since this time: a duration back from now
    /// such as 30m, or an RFC 3339 time such as 2024-05-01T12:00:00Z.
    #[arg(long)]
    since: Option<String>,
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
        Command::Dlq { command } => dlq(cli.workers, command),
    }
}

fn dlq(workers: Option<u16>, command: DlqCommand) -> ExitCode {
    let spool = match &command {
        DlqCommand::List { spool } | DlqCommand::Replay { spool, .. } => spool,
    };
    let (dirs, filter) = match spool_selection(spool) {
        Ok(selection) => selection,
        Err(message) => {
            eprintln!("tandem: {message}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    match command {
        DlqCommand::List { .. } => match tandem::dlq::list(&dirs, &filter, &mut out, &mut err) {
            Ok(totals) => {
                eprintln!(
                    "tandem: {} records listed, {} corrupt records skipped",
                    totals.selected, totals.corrupt
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("tandem: {}", tandem::errors::chain_message(&error));
                ExitCode::FAILURE
            }
        },
        DlqCommand::Replay {
            dry_run,
            timeout,
            spool,
        } => {
            let trusted_roots = match replay_trusted_roots(&spool) {
                Ok(roots) => roots,
                Err(error) => {
                    eprintln!("tandem: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let options = tandem::dlq::ReplayOptions {
                dry_run,
                timeout,
                trusted_roots,
                connect_timeout: tandem::config::DEFAULT_CONNECT_TIMEOUT,
            };
            let replayed = run(workers, async move {
                let totals =
                    tandem::dlq::replay(&dirs, &filter, &options, &mut out, &mut err).await?;
                eprintln!(
                    "tandem: {} records selected, {} delivered and removed, {} failed, {} \
                     corrupt records skipped",
                    totals.selected, totals.delivered, totals.failed, totals.corrupt
                );
                if totals.failed > 0 {
                    anyhow::bail!(
                        "{} of the selected records were not delivered and stay in the spool",
                        totals.failed
                    );
                }
                Ok(())
            });
            replayed
        }
    }
}

/// Resolves the spool directories and the record filter of a dlq command.
/// Reads the extra trust roots of the config named by --config, if any.
fn replay_trusted_roots(
    args: &SpoolArgs,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, tandem::config::ConfigError> {
    match &args.config {
        Some(path) => Config::load(Some(path))?.tls.secondary_roots(),
        None => Ok(Vec::new()),
    }
}

fn spool_selection(args: &SpoolArgs) -> Result<(Vec<PathBuf>, tandem::dlq::Filter), String> {
    let dirs = if !args.spool_dirs.is_empty() {
        args.spool_dirs.clone()
    } else if let Some(path) = &args.config {
        let config = Config::load(Some(path)).map_err(|error| error.to_string())?;
        let dirs = config.spool_dirs();
        if dirs.is_empty() {
            return Err(format!(
                "config {} has no fanout routes, so it names no spool directory",
                path.display()
            ));
        }
        dirs
    } else {
        return Err("name the spool with --spool-dir DIR or --config FILE".to_string());
    };
    let since = args
        .since
        .as_deref()
        .map(|text| tandem::dlq::parse_since(text, std::time::SystemTime::now()))
        .transpose()?;
    Ok((
        dirs,
        tandem::dlq::Filter {
            route: args.route.clone(),
            since,
        },
    ))
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
            tracing::error!(error = tandem::errors::chain_message(&error), "exiting");
            eprintln!("tandem: {}", tandem::errors::chain_message(&error));
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
