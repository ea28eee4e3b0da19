//! Fault injection for the ledger client, shared by tests: hold adds bound for a bookie,
//! skip the fence request to a bookie during recovery, drop recovery reads to a bookie, or
//! flip a byte in what a bookie answers to them.
//! Off (and free) unless a test installs rules.

use std::collections::HashSet;
use std::sync::Mutex;

use magnetar_proto::bookie::AddRequest;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Default)]
struct Rules {
    /// (bookie, first entry): adds of these entries to this bookie are held.
    hold_adds: Vec<(String, i64)>,
    held: Vec<(String, AddRequest, UnboundedSender<AddRequest>)>,
    skip_fence: HashSet<String>,
    drop_reads: HashSet<String>,
    corrupt_reads: HashSet<String>,
    active: bool,
}

/// Injected faults.
#[derive(Default)]
pub struct Faults {
    rules: Mutex<Rules>,
}

impl Faults {
    fn lock(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds adds of entries `>= from_entry` bound for `bookie` until [`Faults::release_adds`].
    pub fn hold_adds(&self, bookie: &str, from_entry: i64) {
        let mut r = self.lock();
        r.active = true;
        r.hold_adds.push((bookie.to_owned(), from_entry));
    }

    /// Sends every held add on and stops holding.
    pub fn release_adds(&self) -> usize {
        let held = {
            let mut r = self.lock();
            r.hold_adds.clear();
            std::mem::take(&mut r.held)
        };
        let n = held.len();
        for (_, req, tx) in held {
            let _ = tx.send(req);
        }
        n
    }

    /// Sends the adds held for `bookie` on and stops holding them; others stay held.
    pub fn release_adds_to(&self, bookie: &str) -> usize {
        let mine = {
            let mut r = self.lock();
            r.hold_adds.retain(|(b, _)| b != bookie);
            let (mine, rest): (Vec<_>, Vec<_>) =
                std::mem::take(&mut r.held).into_iter().partition(|(b, _, _)| b == bookie);
            r.held = rest;
            mine
        };
        let n = mine.len();
        for (_, req, tx) in mine {
            let _ = tx.send(req);
        }
        n
    }

    /// Adds currently held.
    pub fn held_adds(&self) -> usize {
        self.lock().held.len()
    }

    /// Recovery will not send its fence + LAC request to `bookie`.
    pub fn skip_fence(&self, bookie: &str) {
        let mut r = self.lock();
        r.active = true;
        r.skip_fence.insert(bookie.to_owned());
    }

    /// Recovery reads to `bookie` get no answer.
    pub fn drop_reads(&self, bookie: &str) {
        let mut r = self.lock();
        r.active = true;
        r.drop_reads.insert(bookie.to_owned());
    }

    /// Recovery reads answered by `bookie` arrive with one payload byte flipped.
    pub fn corrupt_reads(&self, bookie: &str) {
        let mut r = self.lock();
        r.active = true;
        r.corrupt_reads.insert(bookie.to_owned());
    }

    /// Sends `req` to `bookie` through `tx` unless a rule holds it.
    pub(crate) fn send_add(&self, bookie: &str, req: AddRequest, tx: &UnboundedSender<AddRequest>) -> bool {
        {
            let mut r = self.lock();
            if r.active && r.hold_adds.iter().any(|(b, from)| b == bookie && req.entry_id >= *from) {
                r.held.push((bookie.to_owned(), req, tx.clone()));
                return true;
            }
        }
        tx.send(req).is_ok()
    }

    pub(crate) fn skips_fence(&self, bookie: &str) -> bool {
        let r = self.lock();
        r.active && r.skip_fence.contains(bookie)
    }

    pub(crate) fn drops_reads(&self, bookie: &str) -> bool {
        let r = self.lock();
        r.active && r.drop_reads.contains(bookie)
    }

    pub(crate) fn corrupts_reads(&self, bookie: &str) -> bool {
        let r = self.lock();
        r.active && r.corrupt_reads.contains(bookie)
    }
}
