//! Process resource limits.
//!
//! A bookie keeps one file open per RocksDB table and blob file (one of each per checkpoint,
//! so about forty per GB of entries kept at the default sizes), plus journal segments and a
//! socket per client. Many systems start services with a soft limit of 1024 open files and a
//! much higher hard limit, so every server role raises its soft limit to the hard one at start,
//! and the entry store keeps its open files within a share of whatever the limit is.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Raises this process's soft limit on open files to its hard limit. Returns the soft limit
/// in force afterwards (`None`: unlimited).
pub fn raise_open_file_limit() -> Option<u64> {
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let raised = Rlimit { current: lim.maximum, maximum: lim.maximum };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, soft = ?lim.current, hard = ?lim.maximum, "could not raise the open-file limit");
        }
    }
    open_file_limit()
}

/// This process's soft limit on open files (`None`: unlimited).
pub fn open_file_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is the failure report in tests
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let before = getrlimit(Resource::Nofile);
        if let Some(hard) = before.maximum {
            // Start from a lower soft limit, as a service manager might.
            let low = hard.min(256);
            setrlimit(Resource::Nofile, Rlimit { current: Some(low), maximum: Some(hard) }).unwrap();
            assert_eq!(open_file_limit(), Some(low));
        }
        assert_eq!(raise_open_file_limit(), before.maximum);
        assert_eq!(getrlimit(Resource::Nofile).current, before.maximum);
    }
}
