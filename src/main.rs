//! The `magnetar` binary: one subcommand per role. Each parses its flags, loads its config
//! layers, starts tracing and hands over to a library `run`.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before any thread starts or buffer is allocated (see `magnetar_common::malloc`).
    let malloc = magnetar_common::malloc::tune();
    let args = cli::Cli::parse();
    magnetar_common::telemetry::init_tracing(magnetar_common::telemetry::log_format_from_env());
    tracing::debug!(?malloc, "allocator thresholds");
    // Bookies keep many files open (see `magnetar_common::limits`).
    let files = magnetar_common::limits::raise_open_file_limit();
    tracing::debug!(limit = ?files, "open-file limit");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::dispatch(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
