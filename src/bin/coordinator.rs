//! `coordinator --config job.toml [--listen ADDR] [--local-workers N]`: owns a job and serves it over gRPC.
//! With `--local-workers N` it also starts N workers on this machine (the one-command path for one box) and
//! restarts one that dies (`coordinator::local`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;

use ddpo::config::Config;
use ddpo::coordinator::local::{LocalWorkerSpec, LocalWorkers};
use ddpo::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "coordinator",
    version,
    about = "Coordinates a distributed ddpo job"
)]
struct Cli {
    #[arg(long)]
    config: PathBuf,
    /// Listen address (default: cluster.listen from the config). Port 0 picks a free port.
    #[arg(long)]
    listen: Option<String>,
    /// Start this many workers on this machine (CPU, or one per visible GPU index in order).
    #[arg(long, default_value_t = 0)]
    local_workers: usize,
    /// Device for local workers: cpu, or cuda (worker i gets cuda:i).
    #[arg(long, default_value = "cpu")]
    local_device: String,
    /// Keep serving the status endpoint this long after the job ends.
    #[arg(long, default_value_t = 2)]
    linger_secs: u64,
    /// Write the bound address to this file once listening (for scripts using port 0).
    #[arg(long)]
    address_file: Option<PathBuf>,
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format.unwrap_or_else(LogFormat::from_env));
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    let cfg = Config::load(&cli.config)?;
    let problems = ddpo::data::check_files(&cfg);
    if !problems.is_empty() {
        bail!(
            "config {}:\n  - {}",
            cli.config.display(),
            problems.join("\n  - ")
        );
    }
    // Workers get the config as this process resolved it (file + environment overrides).
    let config_toml = toml::to_string(&cfg).context("serialising the config for workers")?;
    let listen = cli
        .listen
        .clone()
        .unwrap_or_else(|| cfg.cluster.listen.clone());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr()?;
        if let Some(f) = &cli.address_file {
            std::fs::write(f, addr.to_string()).with_context(|| format!("writing {}", f.display()))?;
        }
        let workers = (cli.local_workers > 0).then(|| {
            // Split the cores between the local workers (oversubscribed libtorch threads spin and slow
            // every rank down while they wait for each other).
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let devices = (0..cli.local_workers)
                .map(|i| match cli.local_device.as_str() {
                    "cuda" => format!("cuda:{i}"),
                    d => d.to_string(),
                })
                .collect();
            let spec = LocalWorkerSpec {
                exe: std::env::current_exe()
                    .map(|e| e.with_file_name("worker"))
                    .unwrap_or_else(|_| "worker".into()),
                coordinator_url: format!("http://127.0.0.1:{}", addr.port()),
                devices,
                threads: (cores / cli.local_workers).max(1),
                backoff: std::time::Duration::from_secs(1),
            };
            tracing::info!(workers = cli.local_workers, "local workers started");
            LocalWorkers::start(&spec)
        });
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("signal handler");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping the coordinator (state is saved)"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: stopping the coordinator"),
            }
        };
        let linger = std::time::Duration::from_secs(cli.linger_secs);
        let ok = ddpo::coordinator::serve(cfg, config_toml, listener, shutdown, linger).await?;
        if let Some(w) = workers {
            w.stop(std::time::Duration::from_secs(3)).await;
        }
        Ok(ok)
    })
}
