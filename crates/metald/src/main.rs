//! The `metald` binary: the daemon (`metald` or `metald serve`) and asset management
//! (`metald assets import|list|remove`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use metald::config::{which, Config, LogFormat};
use metald::store::AssetKind;

#[derive(Parser)]
#[command(
    name = "metald",
    version,
    about = "Runs microVMs for customers behind a ConnectRPC/REST API"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default). Configured by UNKEY_METALD_* variables.
    Serve,
    /// Manage the asset store (kernels, initrds, disk images) under UNKEY_METALD_DATA_DIR.
    Assets {
        #[command(subcommand)]
        command: AssetCommand,
    },
}

#[derive(Subcommand)]
enum AssetCommand {
    /// Copy a file into the store under an image id.
    Import {
        /// Image id callers will use.
        #[arg(long)]
        id: String,
        /// What the file is.
        #[arg(long, value_enum)]
        kind: Kind,
        /// The file.
        #[arg(long)]
        file: PathBuf,
        /// For kernels: the initrd asset to boot with it.
        #[arg(long)]
        initrd: Option<String>,
        /// For root filesystems: the console line that shows the guest is up.
        #[arg(long)]
        ready_marker: Option<String>,
        /// The one customer who may boot it; without it the asset is public.
        #[arg(long, value_parser = parse_customer)]
        owner: Option<String>,
    },
    /// List the assets.
    List,
    /// Remove an asset no VM uses.
    Remove {
        /// Image id.
        id: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Kernel,
    Initrd,
    Rootfs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::from_env(|k| std::env::var(k).ok(), which) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("metald: {e}");
            return ExitCode::from(2);
        }
    };
    let traces = init_logging(cfg.log_format, cfg.otel_endpoint.as_deref());
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cfg),
        Command::Assets { command } => assets(&cfg, command),
    };
    if let Some(p) = traces {
        // Flushes spans still in the batch processor.
        if let Err(e) = p.shutdown() {
            eprintln!("metald: flushing traces: {e}");
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metald: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr (JSON or text); with an OTLP endpoint, spans are exported as traces too.
/// Returns the tracer provider to flush at exit.
fn init_logging(
    format: LogFormat,
    otel: Option<&str>,
) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = tracing_subscriber::EnvFilter::try_from_env("UNKEY_METALD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = match format {
        // json-subscriber rather than tracing-subscriber's JSON: it adds the OpenTelemetry
        // trace and span ids to every line logged inside a span.
        LogFormat::Json => json_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .flatten_event(true)
            .with_current_span(true)
            .with_opentelemetry_ids(true)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (provider, otel_error) = match metald::telemetry::tracer_provider(otel) {
        Ok(p) => (Some(p), None),
        // Export is off, but ids still go into the logs.
        Err(e) => (metald::telemetry::tracer_provider(None).ok(), Some(e)),
    };
    let otel_layer = provider.as_ref().map(metald::telemetry::layer);
    tracing_subscriber::registry()
        .with(otel_layer)
        .with(fmt.with_filter(filter))
        .init();
    if let Some(e) = otel_error {
        tracing::error!(error = %metald::report::Chain(&e), "trace export is off");
    }
    provider
}

fn serve(cfg: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(metald::daemon::run(cfg))
        .context("metald failed")
}

/// A customer id as the API knows them (`--owner`).
fn parse_customer(s: &str) -> Result<String, String> {
    s.parse::<metald::domain::CustomerId>()
        .map(|c| c.to_string())
        .map_err(|e| e.to_string())
}

fn assets(cfg: &Config, command: AssetCommand) -> anyhow::Result<()> {
    let store = metald::daemon::open_store(cfg)?;
    let assets = metald::daemon::open_assets(&cfg.data_dir, store.clone())?;
    match command {
        AssetCommand::Import {
            id,
            kind,
            file,
            initrd,
            ready_marker,
            owner,
        } => {
            let kind = match kind {
                Kind::Kernel => AssetKind::Kernel,
                Kind::Initrd => AssetKind::Initrd,
                Kind::Rootfs => AssetKind::Rootfs,
            };
            let rec = assets
                .import(&metald::assets::ImportRequest {
                    id,
                    kind,
                    source: file.clone(),
                    initrd_id: initrd,
                    ready_marker,
                    owner,
                })
                .with_context(|| format!("importing {}", file.display()))?;
            println!(
                "{}\t{}\t{}\t{}",
                rec.id,
                rec.kind.as_str(),
                rec.size_bytes,
                rec.sha256
            );
        }
        AssetCommand::List => {
            println!("ID\tKIND\tSIZE\tSHA256\tINITRD\tREADY_MARKER\tOWNER");
            for a in assets.list()? {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    a.id,
                    a.kind.as_str(),
                    a.size_bytes,
                    a.sha256,
                    a.initrd_id.as_deref().unwrap_or("-"),
                    a.ready_marker.as_deref().unwrap_or("-"),
                    a.owner.as_deref().unwrap_or("public")
                );
            }
        }
        AssetCommand::Remove { id } => {
            let users = metald::service::asset_users(&*store, &id)?;
            assets
                .remove(&id, &users)
                .with_context(|| format!("removing {id}"))?;
            println!("removed {id}");
        }
    }
    Ok(())
}
