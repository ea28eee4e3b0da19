//! Shared plumbing for the Magnetar binaries: layered configuration
//! ([`config`]), tracing setup ([`telemetry`]), signal-driven graceful
//! shutdown ([`shutdown`]) and common error types ([`error`]).

pub mod config;
pub mod error;
pub mod limits;
pub mod malloc;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
