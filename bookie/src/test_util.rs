//! Helpers shared by unit tests.

use std::path::Path;

/// Bytes of `path` in the page cache (util-linux's `fincore`).
#[allow(clippy::unwrap_used)]
pub(crate) fn resident_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(path)
        .output()
        .expect("running fincore (util-linux)");
    assert!(out.status.success(), "fincore failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
