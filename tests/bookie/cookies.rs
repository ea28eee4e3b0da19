//! Cookies: a bookie whose directories do not match its registered identity refuses to start
//! and says which directory and why.

use std::time::Duration;

use crate::support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_or_swapped_directories_refuse_start() {
    let mut cluster = Cluster::new(2, &[], true).await;
    for b in &mut cluster.bookies {
        b.terminate();
    }
    // Restarting unchanged works.
    cluster.bookies[0].start().await;
    cluster.bookies[0].terminate();

    // Wiped journal directory.
    let journal = cluster.bookies[0].journal.clone();
    std::fs::remove_dir_all(&journal).expect("wipe");
    cluster.bookies[0].spawn();
    assert!(cluster.bookies[0].wait_exit_failure(Duration::from_secs(30)), "a wiped directory must refuse start");
    let log = cluster.bookies[0].log_tail();
    assert!(log.contains("has no cookie") && log.contains("journal"), "{log}");

    // Bookie 1 given bookie 0's ledger directory.
    let (l0, l1) = (cluster.bookies[0].ledgers.clone(), cluster.bookies[1].ledgers.clone());
    let tmp = l1.with_extension("swap");
    std::fs::rename(&l1, &tmp).expect("swap");
    std::fs::rename(&l0, &l1).expect("swap");
    std::fs::rename(&tmp, &l0).expect("swap");
    cluster.bookies[1].spawn();
    assert!(cluster.bookies[1].wait_exit_failure(Duration::from_secs(30)), "a swapped directory must refuse start");
    let log = cluster.bookies[1].log_tail();
    assert!(log.contains("belongs to bookie `bookie-0`"), "{log}");
    cluster.shutdown().await;
}
