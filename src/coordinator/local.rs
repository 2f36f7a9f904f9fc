//! `coordinator --local-workers N`: worker processes on this machine, supervised. A worker that dies before
//! the job is over (killed, crashed) is started again after a back-off, a bounded number of times per slot, as
//! the Slurm script's restart loop does on a cluster; at the end every worker is asked to stop (SIGTERM) at
//! once and killed if it has not exited within the grace period, so the coordinator exits within seconds.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Restarts per worker slot before it is given up.
pub const MAX_RESTARTS: usize = 3;

/// What one local worker runs.
#[derive(Debug, Clone)]
pub struct LocalWorkerSpec {
    pub exe: PathBuf,
    pub coordinator_url: String,
    /// `cpu` or `cuda:N`, per slot.
    pub devices: Vec<String>,
    /// libtorch threads per worker (the cores split between them).
    pub threads: usize,
    /// First back-off before a restart (doubles each time).
    pub backoff: Duration,
}

/// The running supervisors; [`LocalWorkers::stop`] ends them.
pub struct LocalWorkers {
    stop: watch::Sender<bool>,
    slots: Vec<JoinHandle<()>>,
}

impl LocalWorkers {
    /// Starts one supervised worker per device of `spec`.
    pub fn start(spec: &LocalWorkerSpec) -> Self {
        let (stop, stopped) = watch::channel(false);
        let slots = (0..spec.devices.len())
            .map(|i| tokio::spawn(supervise(spec.clone(), i, stopped.clone())))
            .collect();
        Self { stop, slots }
    }

    /// Asks every worker to stop (SIGTERM, all at once), kills those still running after `grace`, and waits
    /// for the supervisors.
    pub async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        for s in self.slots {
            let _ = tokio::time::timeout(grace + Duration::from_secs(2), s).await;
        }
    }
}

fn spawn(spec: &LocalWorkerSpec, i: usize) -> std::io::Result<Child> {
    Command::new(&spec.exe)
        .args(["--coordinator", &spec.coordinator_url])
        .args(["--device", &spec.devices[i], "--ring-bind", "127.0.0.1:0"])
        .args(["--threads", &spec.threads.to_string()])
        .kill_on_drop(true)
        .spawn()
}

/// One slot: run the worker, restart it when it dies early (bounded, with back-off), stop it on request.
async fn supervise(spec: LocalWorkerSpec, i: usize, mut stopped: watch::Receiver<bool>) {
    let mut restarts = 0;
    let mut backoff = spec.backoff;
    loop {
        let mut child = match spawn(&spec, i) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    slot = i,
                    "cannot start local worker {}: {e}",
                    spec.exe.display()
                );
                return;
            }
        };
        let status = tokio::select! {
            s = child.wait() => s,
            _ = stop_requested(&mut stopped) => {
                terminate(&mut child, Duration::from_secs(3)).await;
                return;
            }
        };
        match status {
            Ok(s) if s.success() => return,
            _ if restarts >= MAX_RESTARTS => {
                tracing::error!(
                    slot = i,
                    "local worker exited ({}) {MAX_RESTARTS} times; not restarting",
                    describe(&status)
                );
                return;
            }
            _ => {
                restarts += 1;
                tracing::warn!(
                    slot = i,
                    restarts,
                    "local worker exited ({}); restarting in {backoff:?}",
                    describe(&status)
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop_requested(&mut stopped) => return,
                }
                backoff *= 2;
            }
        }
    }
}

/// Resolves once a stop was requested (the watch guard is dropped at once, so the future stays `Send`).
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

fn describe(s: &std::io::Result<ExitStatus>) -> String {
    match s {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // Safety: `pid` is our own child, still unreaped (we hold its handle).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}
