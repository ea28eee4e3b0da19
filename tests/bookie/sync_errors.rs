//! A disk that fails fdatasync. The bookie runs with a small preloaded library that makes
//! `fdatasync` and `fsync` on its journal files fail with EIO while a trigger file exists (the
//! library is compiled here with the system C compiler, which cargo needs as its linker
//! anyway). After a failed sync the page cache may have dropped the pages that failed, and a
//! later sync can report success without them: the bookie must acknowledge nothing from then
//! on, and every add it acknowledged before must survive a restart.

use std::path::{Path, PathBuf};
use std::process::Command;

use magnetar_bookie::client::LedgerConfig;

use crate::support::{payload, Cluster};

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Fails syncs of files whose path holds $MAGNETAR_TEST_FAIL_SYNC_PATH while the file
   $MAGNETAR_TEST_FAIL_SYNC_TRIGGER exists. */
static int failing(int fd) {
    const char *trigger = getenv("MAGNETAR_TEST_FAIL_SYNC_TRIGGER");
    const char *match = getenv("MAGNETAR_TEST_FAIL_SYNC_PATH");
    char link[64], path[4096];
    ssize_t n;
    if (!trigger || !match || access(trigger, F_OK) != 0) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return strstr(path, match) != NULL;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd);
}
"#;

/// Compiles the failing-sync library into `dir`.
fn build_shim(dir: &Path) -> PathBuf {
    let src = dir.join("failsync.c");
    let lib = dir.join("libfailsync.so");
    std::fs::write(&src, SHIM).expect("write the shim source");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}` (cargo links with it): {e}"));
    assert!(out.status.success(), "compiling the shim failed:\n{}", String::from_utf8_lossy(&out.stderr));
    lib
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_journal_fdatasync_stops_every_acknowledgement() {
    let mut cluster = Cluster::new(1, &["storage.checkpoint_interval_ms=3600000"], false).await;
    let lib = build_shim(cluster.dir.path());
    let trigger = cluster.dir.path().join("fail-syncs-now");
    // The library matches the path the kernel reports for the file: the canonical one.
    let b = &cluster.bookies[0];
    let root = std::fs::canonicalize(b.journal.parent().expect("bookie root")).expect("canonical root");
    let journal = root.join(b.journal.file_name().expect("journal dir")).to_string_lossy().into_owned();
    cluster.bookies[0].env = vec![
        ("LD_PRELOAD".into(), lib.to_string_lossy().into_owned()),
        ("MAGNETAR_TEST_FAIL_SYNC_TRIGGER".into(), trigger.to_string_lossy().into_owned()),
        ("MAGNETAR_TEST_FAIL_SYNC_PATH".into(), journal),
    ];
    cluster.bookies[0].start().await;
    let client = cluster.ledger_client();

    // Healthy: every add is acknowledged (1 KiB: the journal carries the payload).
    let w = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    let id = w.id();
    for e in 0..50 {
        assert_eq!(w.append(payload(id, e, 1024)).await.expect("append before the failure"), e);
    }

    // The disk fails the journal's fdatasync: the add is not acknowledged.
    std::fs::write(&trigger, b"").expect("trigger");
    assert!(w.append(payload(id, 50, 1024)).await.is_err(), "an add was acknowledged after its fdatasync failed");
    drop(w);
    // The disk "recovers": the bookie still acknowledges nothing, on any ledger.
    std::fs::remove_file(&trigger).expect("trigger");
    let w2 = client.create(LedgerConfig::new(1, 1, 1)).await.expect("create");
    assert!(w2.append(payload(w2.id(), 0, 1024)).await.is_err(), "an add was acknowledged after a failed fdatasync");
    drop(w2);
    let log = std::fs::read_to_string(&cluster.bookies[0].log).expect("bookie log");
    assert!(log.contains("journal fdatasync failed"), "{}", cluster.bookies[0].log_tail());

    // Restarted without the failing library: everything acknowledged before is there.
    cluster.bookies[0].kill();
    cluster.bookies[0].env.clear();
    cluster.bookies[0].start().await;
    let md = client.recover(id).await.unwrap_or_else(|e| panic!("recover: {e}\n{}", cluster.logs()));
    assert!(md.last_entry >= 49, "closed at {} below acknowledged entry 49", md.last_entry);
    let entries = client.open_reader(id).await.expect("reader").read(0, 49).await.expect("read");
    for (e, got) in entries.iter().enumerate() {
        assert_eq!(&got[..], &payload(id, e as i64, 1024)[..], "entry {e}");
    }
    cluster.shutdown().await;
}
