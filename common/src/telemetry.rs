//! Process-wide tracing setup shared by all Magnetar binaries.
//!
//! Logs go to stderr so that stdout stays free for command output (CLI tools
//! print JSON there). The filter comes from `RUST_LOG`, the convention every
//! Rust operator knows, falling back to the project-specific `MAGNETAR_LOG`.

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;

/// Filter used when neither `RUST_LOG` nor `MAGNETAR_LOG` is set.
/// openraft logs every election and batching decision at info; its warnings are what an
/// operator needs by default.
pub const DEFAULT_LOG_FILTER: &str = "info,openraft=warn";

/// Output format of the log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable single-line records.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// Returned when a string is neither `text` nor `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown log format `{0}` (expected `text` or `json`)")]
pub struct ParseLogFormatError(pub String);

impl FromStr for LogFormat {
    type Err = ParseLogFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(ParseLogFormatError(s.to_owned())),
        }
    }
}

/// Reads `MAGNETAR_LOG_FORMAT`; unset means [`LogFormat::Text`].
///
/// An unrecognised value also falls back to text, with a note on stderr:
/// tracing is not initialised yet at this point, and refusing to start over
/// a log format would be out of proportion.
pub fn log_format_from_env() -> LogFormat {
    let raw = std::env::var("MAGNETAR_LOG_FORMAT").ok();
    match format_from(raw.as_deref()) {
        Ok(format) => format,
        Err(e) => {
            eprintln!("warning: MAGNETAR_LOG_FORMAT: {e}; using text");
            LogFormat::Text
        }
    }
}

fn format_from(raw: Option<&str>) -> Result<LogFormat, ParseLogFormatError> {
    match raw {
        None => Ok(LogFormat::Text),
        Some(s) if s.trim().is_empty() => Ok(LogFormat::Text),
        Some(s) => s.parse(),
    }
}

/// Picks the filter directive: `RUST_LOG`, then `MAGNETAR_LOG`, then
/// [`DEFAULT_LOG_FILTER`]. Empty values count as unset.
fn filter_directive(rust_log: Option<String>, magnetar_log: Option<String>) -> String {
    [rust_log, magnetar_log]
        .into_iter()
        .flatten()
        .find(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_owned())
}

/// Installs the global tracing subscriber writing to stderr.
///
/// Uses `try_init`, so a second call (several tests in one process, or a
/// library embedding) is a silent no-op instead of a panic.
pub fn init_tracing(format: LogFormat) {
    let directive = filter_directive(std::env::var("RUST_LOG").ok(), std::env::var("MAGNETAR_LOG").ok());
    let (filter, bad_directive) = match EnvFilter::try_new(&directive) {
        Ok(filter) => (filter, None),
        Err(e) => (EnvFilter::new(DEFAULT_LOG_FILTER), Some(e)),
    };

    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match format {
        // Escape codes are noise in files and journald, so only colour a tty.
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };

    // Reported only once a subscriber exists to carry the message.
    if let (Ok(()), Some(e)) = (installed, bad_directive) {
        tracing::warn!(
            directive = %directive,
            error = %e,
            "invalid log filter, using `{DEFAULT_LOG_FILTER}`"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is the failure report in tests
mod tests {
    use super::*;

    #[test]
    fn log_format_parses_case_insensitively() {
        assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!(" TEXT ".parse::<LogFormat>().unwrap(), LogFormat::Text);
        let err = "yaml".parse::<LogFormat>().unwrap_err();
        assert!(err.to_string().contains("yaml"));
    }

    #[test]
    fn log_format_display_round_trips() {
        for f in [LogFormat::Text, LogFormat::Json] {
            assert_eq!(f.to_string().parse::<LogFormat>().unwrap(), f);
        }
    }

    #[test]
    fn log_format_serde_is_lowercase() {
        assert_eq!(serde_json::to_string(&LogFormat::Json).unwrap(), "\"json\"");
        let f: LogFormat = serde_json::from_str("\"text\"").unwrap();
        assert_eq!(f, LogFormat::Text);
        assert!(serde_json::from_str::<LogFormat>("\"Json\"").is_err());
    }

    #[test]
    fn env_format_defaults_to_text() {
        assert_eq!(format_from(None).unwrap(), LogFormat::Text);
        assert_eq!(format_from(Some("")).unwrap(), LogFormat::Text);
        assert_eq!(format_from(Some("json")).unwrap(), LogFormat::Json);
        assert!(format_from(Some("xml")).is_err());
    }

    #[test]
    fn filter_precedence() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(filter_directive(s("debug"), s("warn")), "debug");
        assert_eq!(filter_directive(None, s("warn")), "warn");
        assert_eq!(filter_directive(s(""), s("warn")), "warn");
        assert_eq!(filter_directive(None, None), DEFAULT_LOG_FILTER);
    }

    #[test]
    fn init_twice_does_not_panic() {
        init_tracing(LogFormat::Text);
        init_tracing(LogFormat::Json);
        tracing::info!("still alive");
    }
}
