//! Conformance suite for [`LedgerStorage`] implementations. Each implementation's tests call
//! [`run_all`] with a function that opens a store in a directory; persistent stores are also
//! closed and reopened to check that `flush` makes writes durable.

use std::path::Path;

use bytes::Bytes;

use super::{EntryWrite, LedgerMeta, LedgerStorage};
use crate::checksum::entry_checksum;
use crate::error::BookieError;

fn entry(ledger: u64, e: i64, payload: &[u8]) -> EntryWrite {
    EntryWrite {
        ledger,
        entry: e,
        checksum: entry_checksum(ledger, e, payload),
        payload: Bytes::copy_from_slice(payload),
    }
}

/// Runs every check. `open(dir)` opens a store rooted in `dir`; `persistent` says whether a
/// reopened store must still hold flushed data.
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub fn run_all<S: LedgerStorage>(open: impl Fn(&Path) -> S, persistent: bool) {
    type Check<S> = fn(&dyn Fn(&Path) -> S, bool);
    let checks: [(&str, Check<S>); 9] = [
        ("absent_entries_and_ledgers", absent),
        ("round_trip_and_isolation", round_trip),
        ("ordering_is_numeric", ordering),
        ("state_round_trip", state),
        ("corrupt_entries_are_errors", corrupt),
        ("delete_ledger", delete),
        ("flush_survives_reopen", reopen),
        ("unindexed_writes", unindexed),
        ("many_entries_at_once", many),
    ];
    for (name, check) in checks {
        let dir = tempfile::tempdir().expect("tempdir");
        eprintln!("storage suite: {name}");
        check(&|p: &Path| open(&p.join("store")), persistent);
        drop(dir);
    }

    fn with_dir<S>(open: &dyn Fn(&Path) -> S) -> (tempfile::TempDir, S) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        (dir, s)
    }

    fn absent<S: LedgerStorage>(open: &dyn Fn(&Path) -> S, _: bool) {
        let (_d, s) = with_dir(open);
        assert!(s.get_entry(1, 0).unwrap().is_none());
        assert!(s.ledger_meta(1).unwrap().is_none());
        assert!(s.last_entry(1).unwrap().is_none());
        assert!(s.ledgers().unwrap().is_empty());
    }

    fn round_trip<S: LedgerStorage>(open: &dyn Fn(&Path) -> S, _: bool) {
        let (_d, s) = with_dir(open);
        let big = vec![7u8; 100_000];
        s.write(&[entry(1, 0, b"a"), entry(1, 1, &big), entry(2, 0, b"c")], &[]).unwrap();
        assert_eq!(&s.get_entry(1, 0).unwrap().unwrap().payload[..], b"a");
        assert_eq!(&s.get_entry(1, 1).unwrap().unwrap().payload[..], &big[..]);
        assert_eq!(&s.get_entry(2, 0).unwrap().unwrap().payload[..], b"c");
        assert!(s.get_entry(2, 1).unwrap().is_none());
        assert_eq!(s.get_entry(1, 0).unwrap().unwrap().checksum, entry_checksum(1, 0, b"a"));
        // Rewriting an entry with the same bytes (journal replay) is harmless.
        s.write(&[entry(1, 0, b"a")], &[]).unwrap();
        assert_eq!(&s.get_entry(1, 0).unwrap().unwrap().payload[..], b"a");
        assert_eq!(s.ledgers().unwrap(), vec![1, 2]);
    }

    fn ordering<S: LedgerStorage>(open: &dyn Fn(&Path) -> S, _: bool) {
        let (_d, s) = with_dir(open);
        let writes: Vec<EntryWrite> = [0i64, 255, 256, 65_536, 9].iter().map(|e| entry(5, *e, b"x")).collect();
        s.write(&writes, &[]).unwrap();
        s.write(&[entry(4, 1_000_000, b"x"), entry(6, 0, b"x")], &[]).unwrap();
        assert_eq!(s.last_entry(5).unwrap(), Some(65_536));
        assert_eq!(s.last_entry(4).unwrap(), Some(1_000_000));
        assert_eq!(s.last_entry(6).unwrap(), Some(0));
        assert_eq!(s.last_entry(7).unwrap(), None);
        assert_eq!(s.ledgers().unwrap(), vec![4, 5, 6]);
    }

    fn state<S: LedgerStorage>(open: &dyn Fn(&Path) -> S, _: bool) {
        let (_d, s) = with_dir(open);
        let m = LedgerMeta { fenced: true, lac: 41, master_key: b"secret".to_vec() };
        s.write(&[], &[(9, m.clone())]).unwrap();
        assert_eq!(s.ledger_meta(9).unwrap(), Some(m));
        assert_eq!(s.ledgers().unwrap(), vec![9]);
        let m2 = LedgerMeta { fenced: false, lac: -1, master_key: vec![] };
        s.write(&[], &[(9, m2.clone())]).unwrap();
        assert_eq!(s.ledger_meta(9).unwrap(), Some(m2));
    }

    fn corrupt<S: LedgerStorage>(open: &dyn Fn(&Path) -> S, _: bool) {
        let (_d, s) = with_dir(open);
        let mut bad = entry(3, 0, b"payload");
        bad.checksum ^= 1;
        s.write(&[bad], &[]).unwrap();
        match s.get_entry(3, 0) {
            Err(BookieError::Corrupt { ledger: 3, entry: 0 }) => {}
            other => panic!("a checksum mismatch must be Corrupt, got {other:?}"),
        }
    }

    /// `get_entries` gives what `get_entry` gives for each, in order (absent and corrupt ones
    /// included, whatever lies around them), and stops once the budget is read.
    fn many<S: LedgerStorage>(open: &dyn Fn(&Path) -> S, _: bool) {
        let (_d, s) = with_dir(open);
        let body = |e: i64| vec![e as u8; if e % 3 == 0 { 70_000 } else { 1000 + e as usize }];
        let writes: Vec<EntryWrite> = (0..40).filter(|e| e % 10 != 7).map(|e| entry(8, e, &body(e))).collect();
        let mut bad = entry(8, 7, b"damaged");
        bad.checksum ^= 1;
        s.write(&writes, &[]).unwrap();
        s.write(&[bad], &[]).unwrap();
        s.flush().unwrap();
        let ids: Vec<i64> = (0..45).collect();
        let got = s.get_entries(8, &ids, usize::MAX);
        assert_eq!(got.len(), ids.len());
        for (&e, r) in ids.iter().zip(&got) {
            match (e, r) {
                (7, Err(BookieError::Corrupt { ledger: 8, entry: 7 })) => {}
                (e, Ok(None)) if e % 10 == 7 || e >= 40 => {}
                (e, Ok(Some(x))) if e % 10 != 7 && e < 40 => assert_eq!(&x.payload[..], &body(e)[..], "entry {e}"),
                (e, other) => panic!("entry {e}: {other:?}"),
            }
        }
        // Out of order and repeated, as asked.
        let some = [30i64, 2, 2, 39];
        let got: Vec<Vec<u8>> =
            s.get_entries(8, &some, usize::MAX).into_iter().map(|r| r.unwrap().unwrap().payload.to_vec()).collect();
        assert_eq!(got, some.iter().map(|&e| body(e)).collect::<Vec<_>>());
        // A budget of 100 kB: entries 0 (70 kB) and 1, 2 (1 kB each), then 3 (70 kB) passes it.
        let got = s.get_entries(8, &ids, 100_000);
        assert_eq!(got.len(), 4, "read up to the entry that passes the budget");
        assert_eq!(s.get_entries(8, &ids, 0).len(), 1, "at least one");
        assert!(s.get_entries(8, &[], 10).is_empty());
    }

    fn delete<S: LedgerStorage>(open: &dyn Fn(&Path) -> S, _: bool) {
        let (_d, s) = with_dir(open);
        s.write(&[entry(1, 0, b"a"), entry(1, 1, b"b"), entry(2, 0, b"c")], &[(1, LedgerMeta::new(b"k"))]).unwrap();
        s.delete_ledger(1).unwrap();
        assert!(s.get_entry(1, 0).unwrap().is_none());
        assert!(s.get_entry(1, 1).unwrap().is_none());
        assert!(s.ledger_meta(1).unwrap().is_none());
        assert_eq!(&s.get_entry(2, 0).unwrap().unwrap().payload[..], b"c");
        assert_eq!(s.ledgers().unwrap(), vec![2]);
        s.delete_ledger(u64::MAX).unwrap();
    }

    fn reopen<S: LedgerStorage>(open: &dyn Fn(&Path) -> S, persistent: bool) {
        if !persistent {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.write(
                &[entry(1, 0, b"durable"), entry(1, 1, &[1u8; 10_000])],
                &[(1, LedgerMeta { fenced: true, lac: 0, master_key: b"k".to_vec() })],
            )
            .unwrap();
            s.flush().unwrap();
        }
        let s = open(dir.path());
        assert_eq!(&s.get_entry(1, 0).unwrap().unwrap().payload[..], b"durable");
        assert_eq!(s.get_entry(1, 1).unwrap().unwrap().payload.len(), 10_000);
        assert!(s.ledger_meta(1).unwrap().unwrap().fenced);
    }

    /// Entries stored unindexed are not readable until indexed (a store that keeps entries
    /// whole indexes them at once); their ledger states are written at once; an entry of a
    /// ledger deleted before the index write stays absent.
    fn unindexed<S: LedgerStorage>(open: &dyn Fn(&Path) -> S, _: bool) {
        let (_d, s) = with_dir(open);
        let entries = [entry(4, 0, b"first"), entry(4, 1, &[7u8; 3000]), entry(5, 0, b"gone")];
        let m = LedgerMeta { fenced: false, lac: 0, master_key: b"k".to_vec() };
        let placed = s.write_unindexed(&entries, &[(4, m.clone())]).unwrap();
        assert_eq!(s.ledger_meta(4).unwrap(), Some(m));
        if let Some(placed) = placed {
            assert_eq!(placed.len(), 3, "one place per entry");
            for e in &entries {
                assert!(
                    s.get_entry(e.ledger, e.entry).unwrap().is_none(),
                    "{}:{} readable before its index",
                    e.ledger,
                    e.entry
                );
            }
            s.delete_ledger(5).unwrap();
            let refs: Vec<_> = entries.iter().zip(placed).map(|(e, at)| (e.ledger, e.entry, at)).collect();
            s.index_refs(&refs).unwrap();
        } else {
            s.delete_ledger(5).unwrap();
        }
        assert_eq!(&s.get_entry(4, 0).unwrap().unwrap().payload[..], b"first");
        assert_eq!(&s.get_entry(4, 1).unwrap().unwrap().payload[..], &[7u8; 3000][..]);
        assert!(s.get_entry(5, 0).unwrap().is_none(), "a deleted ledger's entry was revived");
    }
}
