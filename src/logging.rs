//! Logging set-up shared by the binaries: `RUST_LOG`-style filters (default `info`), human-readable text on
//! a terminal, or one JSON object per line for cluster log collectors (`--log-format json` or
//! `DDPO_LOG_FORMAT=json`).

use tracing_subscriber::{fmt, EnvFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// `DDPO_LOG_FORMAT` when set to `json`, else text.
    pub fn from_env() -> Self {
        match std::env::var("DDPO_LOG_FORMAT").as_deref() {
            Ok("json") => Self::Json,
            _ => Self::Text,
        }
    }
}

/// Installs the global subscriber; logs go to stderr so stdout stays free for command output.
/// Safe to call more than once (later calls are ignored).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}
