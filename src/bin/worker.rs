//! `worker --coordinator URL [--device cpu|cuda:N]`: does a job's work as the coordinator assigns it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;

use ddpo::logging::{self, LogFormat};

#[derive(Parser)]
#[command(name = "worker", version, about = "A ddpo worker")]
struct Cli {
    /// Coordinator URL, e.g. http://10.0.0.1:50051
    #[arg(long)]
    coordinator: String,
    /// cpu, cuda, cuda:N or auto
    #[arg(long, default_value = "auto")]
    device: String,
    /// Where the CPU-ring listener binds (its IP must be reachable by the other workers).
    #[arg(long, default_value = "0.0.0.0:0")]
    ring_bind: String,
    /// Give up after the coordinator has been unreachable this long (seconds).
    #[arg(long, default_value_t = 600)]
    give_up_secs: u64,
    /// libtorch CPU threads for this worker (default: all cores). Workers sharing a machine should split
    /// the cores: oversubscribed threads spin while ranks wait for each other.
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

fn main() -> ExitCode {
    ddpo::util::numerics::init_process();
    let cli = Cli::parse();
    logging::init(cli.log_format.unwrap_or_else(LogFormat::from_env));
    if let Some(t) = cli.threads {
        tch::set_num_threads(t.max(1) as i32);
    }
    let run = || -> Result<bool> {
        let opts = ddpo::worker::WorkerOptions {
            coordinator: cli.coordinator.clone(),
            device: ddpo::config::parse_device(&cli.device)?,
            ring_bind: cli.ring_bind.parse()?,
            give_up_after: Duration::from_secs(cli.give_up_secs),
        };
        let rt = tokio::runtime::Runtime::new()?;
        Ok(rt.block_on(ddpo::worker::run(opts))?)
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
