//! Error types shared across crates.

/// Catch-all error for boundaries where callers only log or propagate.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub use crate::config::ConfigError;
