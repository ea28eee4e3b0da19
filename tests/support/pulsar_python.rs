//! The official Pulsar Python client, driven from tests: `$MAGNETAR_PYTHON`, or the virtualenv
//! `.ci/run` creates at `~/.cache/magnetar-venv`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The interpreter with the `pulsar-client` package.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MAGNETAR_PYTHON") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/magnetar-venv/bin/python")
}

/// Produces `n` messages `msg-<i>` with the official Python client; returns their ids
/// `(ledger, entry, batch index)`.
pub fn produce(url: &str, topic: &str, n: usize, batching: bool) -> Vec<(u64, u64, i64)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/produce.py");
    let py = python();
    let out = Command::new(&py)
        .arg(&script)
        .args([url, topic, &n.to_string(), if batching { "1" } else { "0" }])
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("running {} (the Pulsar Python client; `.ci/run` installs it): {e}", py.display()));
    assert!(out.status.success(), "producer failed: {}", String::from_utf8_lossy(&out.stderr));
    // The client logs to stdout too; the ids are the last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line =
        stdout.lines().rev().find(|l| l.starts_with('[')).unwrap_or_else(|| panic!("no ids in the output:\n{stdout}"));
    let ids: Vec<(u64, u64, i64)> = serde_json::from_str(line).expect("JSON message ids");
    assert_eq!(ids.len(), n);
    ids
}

/// Runs one scenario of `tests/support/scenarios.py` (the official Python client) against
/// the broker at `url`, with topic names starting with `prefix`; panics with its output when
/// the scenario fails.
pub fn scenario(url: &str, name: &str, prefix: &str) {
    scenario_with_web(url, "", name, prefix)
}

/// [`scenario`] for scenarios that also use the broker's admin API, at `web` (host:port).
pub fn scenario_with_web(url: &str, web: &str, name: &str, prefix: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/scenarios.py");
    let py = python();
    let out =
        Command::new(&py).arg(&script).args([url, name, prefix]).env("MAGNETAR_WEB", web).output().unwrap_or_else(
            |e| panic!("running {} (the Pulsar Python client; `.ci/run` installs it): {e}", py.display()),
        );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == format!("ok {name}")),
        "scenario {name} failed ({}):\n{}\n--- client log (tail) ---\n{}",
        out.status,
        stderr.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"),
        stdout.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"),
    );
}
