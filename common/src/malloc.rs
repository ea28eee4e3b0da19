//! The C allocator's settings for server and benchmark processes.
//!
//! Brokers, bookies and clients move payloads in buffers of tens of KiB to a few MiB (client
//! batches of up to 128 KiB and more, frames read for them, bookie read runs of up to 8 MiB).
//! By default glibc serves every allocation above a moving threshold (128 KiB to start with)
//! with its own `mmap` and returns it with `munmap` when freed, and gives the free tail of each
//! heap back to the kernel as soon as it passes a small threshold. Each such buffer then costs
//! a page fault per 4 KiB page on its first write, and every `munmap` interrupts the other
//! cores to flush their TLBs. Measured on a `perf produce` client with one consumer at 345k
//! msg/s of 1 KiB messages against a standalone, in eight alternating pairs of runs: the client
//! took 170–540k page faults in its 17 s, against about 4k with the settings below, used 4–21%
//! less CPU, and the end-to-end p99 was lower in every pair (8.5–25.5 ms against 6.6–16.5 ms;
//! see `docs/benchmarks.md`).
//!
//! [`tune`] therefore sets fixed thresholds: allocations below 32 MiB come from the heaps, and
//! up to 128 MiB of free space stays at a heap's top. Memory already freed is kept for reuse
//! rather than returned, so a process holds on to its peak heap. A user who sets any
//! `glibc.malloc.*` tunable in `GLIBC_TUNABLES` keeps glibc as they configured it.

/// Allocations of this size and above get their own mapping.
pub const MMAP_THRESHOLD_BYTES: usize = 32 << 20;
/// Free space at the top of a heap beyond this is returned to the kernel.
pub const TRIM_THRESHOLD_BYTES: usize = 128 << 20;

/// What [`tune`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tuning {
    /// The thresholds above are in force.
    Applied,
    /// `GLIBC_TUNABLES` sets the allocator's own settings; they are left as given.
    LeftToUser,
    /// glibc refused a setting (or this is not a glibc build); its defaults stay.
    Unavailable,
}

/// Whether a `GLIBC_TUNABLES` value configures the allocator.
pub fn tunables_set_malloc(tunables: &str) -> bool {
    tunables.split(':').any(|t| t.trim_start().starts_with("glibc.malloc."))
}

/// Sets the allocator's thresholds for this process; call once, first thing in `main`.
pub fn tune() -> Tuning {
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| tunables_set_malloc(&t)) {
        return Tuning::LeftToUser;
    }
    set_thresholds()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_thresholds() -> Tuning {
    let as_int = |v: usize| libc::c_int::try_from(v).unwrap_or(libc::c_int::MAX);
    // SAFETY: `mallopt` only changes the allocator's parameters; it is thread-safe and takes
    // plain integers.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, as_int(MMAP_THRESHOLD_BYTES)) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, as_int(TRIM_THRESHOLD_BYTES)) == 1
    };
    if ok {
        Tuning::Applied
    } else {
        Tuning::Unavailable
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_thresholds() -> Tuning {
    Tuning::Unavailable
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is the failure report in tests
mod tests {
    use super::*;

    #[test]
    fn only_malloc_tunables_leave_the_settings_to_the_user() {
        assert!(tunables_set_malloc("glibc.malloc.mmap_threshold=1048576"));
        assert!(tunables_set_malloc("glibc.cpu.hwcaps=-AVX2:glibc.malloc.arena_max=2"));
        assert!(!tunables_set_malloc("glibc.cpu.hwcaps=-AVX2"));
        assert!(!tunables_set_malloc(""));
    }

    /// A 24 MiB buffer comes from the heap once tuned; with glibc's defaults (and nothing of
    /// that size freed before in this process) it would get a mapping of its own.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    #[test]
    fn buffers_below_the_threshold_come_from_the_heap() {
        if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| tunables_set_malloc(&t)) {
            return; // the environment decides; nothing of ours to check
        }
        assert_eq!(tune(), Tuning::Applied);
        // SAFETY: `mallinfo2` only reads the allocator's statistics.
        let mapped = || unsafe { libc::mallinfo2() }.hblks;
        let before = mapped();
        let mut buf: Vec<u8> = Vec::with_capacity(24 << 20);
        buf.resize(24 << 20, 1);
        let during = mapped();
        assert_eq!(std::hint::black_box(&buf)[12 << 20], 1);
        drop(buf);
        assert_eq!(during, before, "a 24 MiB buffer got its own mapping");
    }
}
