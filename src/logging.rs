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

/// Installs the global subscriber; logs go to stderr so stdout stays free for command output. Colours only
/// when stderr is a terminal and `NO_COLOR` is unset, so logs redirected to a file carry no escape codes.
/// Safe to call more than once (later calls are ignored).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(colours_on_stderr())
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}

/// Whether stderr is a terminal that wants colour (`NO_COLOR`, no-color.org, turns it off).
pub fn colours_on_stderr() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none()
}
