//! Linearizability checker for a single register (one key of a key-value store).
//!
//! # Model
//!
//! The register holds an `Option<u64>`: `None` means the key is absent, `Some(v)` means it holds the
//! value `v`. Values are unique ids chosen by the test and never reused. Three operations exist:
//!
//! * [`Op::Write`] — unconditional write; answered with [`Outcome::WriteOk`].
//! * [`Op::Cas`] — compare-and-set; succeeds iff the register holds `expected`, after which it holds
//!   `new`. Answered with [`Outcome::CasResult`] (`false` = precondition failed, register unchanged).
//! * [`Op::Read`] — answered with [`Outcome::ReadValue`].
//!
//! Any op may instead end with [`Outcome::Unknown`] (timeout, lost connection): it may take effect at
//! any point after its invocation, or never. Its `completed` timestamp is ignored (treated as +inf), so
//! it never forces other ops to come after it. An unknown CAS that is linearized at a point where its
//! precondition does not hold is a no-op, which is the same as never linearizing it. Unknown reads
//! impose nothing and are dropped up front.
//!
//! Timestamps: `invoked`/`completed` come from one shared clock. Op `a` must precede op `b` in real
//! time iff `a.completed < b.invoked` (strictly); ops whose invocation equals another op's completion
//! are treated as concurrent, since the clock cannot order them.
//!
//! A history is linearizable iff there is a total order of all ops with a known outcome, plus any
//! subset of the ops with an unknown outcome, that respects real-time order and in which every op's
//! outcome matches a sequential register started from `initial`.
//!
//! # Algorithm
//!
//! Wing & Gong / Lowe (WGL) depth-first search over the ops sorted by invocation time. A search node
//! is (set of linearized ops, register state). An op may be linearized next only if it is *minimal*:
//! it was invoked no later than the earliest completion among the other not-yet-linearized ops with a
//! known outcome (unknown-outcome ops have infinite completion and never block anybody). The search
//! succeeds once every known-outcome op is linearized.
//!
//! Practicality comes from:
//! * **Memoization** (Lowe): every visited (set of linearized ops, state) node is stored in a hash
//!   map; reaching it again means the same subtree, which already failed, so it is skipped. The set
//!   is a `Vec<u64>` bitset, stored compactly (leading words where everything is linearized are
//!   elided). Unknown-outcome ops are kept out of the key and handled by *dominance*: a node whose
//!   linearized unknown ops are a superset of those of a visited node with the same key is skipped
//!   too (an unlinearized unknown op never constrains anything, so fewer is never worse).
//! * **Greedy read-only ops**: a minimal Read or failed CAS (they do not change the state) that is
//!   consistent with the current state is linearized immediately without branching. This is safe:
//!   any linearization placing it later can move it to the current point without violating real-time
//!   order (it is minimal) or changing any other op's result.
//! * **Just-in-time unknown ops**: an unknown write/CAS is only tried where it immediately enables a
//!   minimal op that is blocked in the current state (a read of its value, a CAS expecting its value,
//!   or a failed CAS expecting the current value); any other placement can be rewritten to one of
//!   those or to omitting it (see `Search::unknown_enables`). If no known CAS failed, unknown ops whose
//!   value nobody ever reads or expects are dropped up front.
//! * **Stranded values**: once every op that can write value `v` is linearized, `v` can never come
//!   back; so if the register leaves `v` while a pending known Read/CAS still needs `v`, the node is
//!   dead (this catches stale reads and lost writes at once instead of after exhausting the
//!   subtree). Known ops needing a value that is neither the initial value nor written by any op
//!   fail the history before any search.
//! * **Blind values**: values nobody reads or expects are indistinguishable to every op, so they share
//!   one internal state id, merging otherwise distinct search nodes.
//! * An explicit stack (no recursion) and an undo log, so 100k-op histories do not blow the stack.
//!
//! Cost: memory and time grow with the number of search nodes, which depends on how many ops overlap
//! (roughly exponential in the number of mutually concurrent writes in the worst case). Histories of
//! thousands of ops from ~16-32 concurrent clients check in milliseconds (the unit tests include a
//! 2,000-op, 16-client benchmark); 64-way concurrency can take seconds or more.
//!
//! The verdict does not depend on values being unique; uniqueness only makes the checks sharper.
//!
//! On failure the explanation reports the longest linearizable prefix found (by number of known ops
//! placed), the register state after it, and the pending ops that could not be placed next and why.
//! Events are referred to as `#n`, their index in the slice given to [`check`] / [`check_by_key`].

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Unconditional write of `value`.
    Write { value: u64 },
    /// Compare-and-set: succeeds iff the register currently holds `expected` (None = absent); then it
    /// holds `new`.
    Cas { expected: Option<u64>, new: u64 },
    /// Read.
    Read,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Write acknowledged.
    WriteOk,
    /// CAS answered: true = applied, false = precondition failed (register unchanged).
    CasResult(bool),
    /// Read returned this value.
    ReadValue(Option<u64>),
    /// The client does not know whether the op took effect (timeout, connection lost). The op may
    /// take effect at any point after its invocation, or never. For Read, Unknown imposes nothing.
    Unknown,
}

/// One completed (or abandoned) client operation. `invoked <= completed`; for
/// [`Outcome::Unknown`], `completed` is ignored (treated as +infinity).
#[derive(Clone, Debug)]
pub struct Event {
    pub client: usize,
    pub op: Op,
    pub outcome: Outcome,
    pub invoked: u64,
    pub completed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    NotLinearizable { explanation: String },
}

impl Verdict {
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }
}

/// Checks a single-register history starting from `initial`.
pub fn check(initial: Option<u64>, history: &[Event]) -> Verdict {
    let ids: Vec<usize> = (0..history.len()).collect();
    check_with_ids(initial, history, &ids)
}

/// Splits a multi-key history by key and checks each key independently from `initial = None`.
/// Keys are checked in order of first appearance; the first failure is returned as an error naming
/// the key. Event numbers (`#n`) in the explanation are indices into `history`.
pub fn check_by_key(history: &[(String, Event)]) -> Result<(), String> {
    let mut order: Vec<&str> = Vec::new();
    let mut per_key: HashMap<&str, (Vec<Event>, Vec<usize>)> = HashMap::new();
    for (idx, (key, event)) in history.iter().enumerate() {
        let entry = per_key.entry(key.as_str()).or_insert_with(|| {
            order.push(key.as_str());
            (Vec::new(), Vec::new())
        });
        entry.0.push(event.clone());
        entry.1.push(idx);
    }
    for key in order {
        let (events, ids) = &per_key[key];
        if let Verdict::NotLinearizable { explanation } = check_with_ids(None, events, ids) {
            return Err(format!(
                "key {key:?} is not linearizable ({} events for this key): {explanation}",
                events.len()
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Internals
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Acknowledged write.
    Write(u64),
    /// CAS that reported success: (expected, new).
    CasOk(Option<u64>, u64),
    /// CAS that reported failure (read-only): expected.
    CasFail(Option<u64>),
    /// Read with a known result (read-only).
    Read(Option<u64>),
    /// Write with unknown outcome.
    MaybeWrite(u64),
    /// CAS with unknown outcome: (expected, new).
    MaybeCas(Option<u64>, u64),
}

impl Kind {
    fn known(self) -> bool {
        !matches!(self, Kind::MaybeWrite(_) | Kind::MaybeCas(..))
    }
    /// Value written if the op changes the state.
    fn new_value(self) -> Option<u64> {
        match self {
            Kind::Write(v) | Kind::MaybeWrite(v) | Kind::CasOk(_, v) | Kind::MaybeCas(_, v) => Some(v),
            Kind::Read(_) | Kind::CasFail(_) => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    kind: Kind,
    invoked: u64,
    /// `u64::MAX` for unknown outcome.
    completed: u64,
    /// Index into the history slice passed to `check_with_ids`.
    idx: usize,
    /// State id the op observes: read result (Read) or expected value (CAS).
    a: u64,
    /// State id the op leaves behind if it changes the state (Write/CAS).
    b: u64,
}

/// Internal state ids: `None`, every value that some op can observe (a read result or a CAS's
/// expected value) gets its own id, and all other ("blind") values share one id: no op can tell
/// them apart, so merging them is sound and shrinks the search space.
const STATE_NONE: u64 = 0;
const STATE_BLIND: u64 = 1;

struct StateIds(HashMap<u64, u64, FxBuild>);

impl StateIds {
    fn new(ops: &[Entry]) -> Self {
        let mut map: HashMap<u64, u64, FxBuild> = HashMap::default();
        for o in ops {
            if let Kind::Read(Some(v)) | Kind::CasOk(Some(v), _) | Kind::CasFail(Some(v)) | Kind::MaybeCas(Some(v), _) =
                o.kind
            {
                let next = map.len() as u64 + 2;
                map.entry(v).or_insert(next);
            }
        }
        StateIds(map)
    }
    fn id(&self, v: Option<u64>) -> u64 {
        match v {
            None => STATE_NONE,
            Some(v) => self.0.get(&v).copied().unwrap_or(STATE_BLIND),
        }
    }
}

/// FxHash-style hasher: much faster than SipHash for the bitset keys of the memo table.
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.add(x);
    }
    fn write_usize(&mut self, x: usize) {
        self.add(x as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

/// Memo: known-outcome part of the linearized set + state -> subsets of linearized unknown ops.
type Memo = HashMap<Box<[u64]>, Vec<Box<[u64]>>, FxBuild>;

/// `a ⊆ b` for bitsets of equal length.
fn is_subset(a: &[u64], b: &[u64]) -> bool {
    a.iter().zip(b).all(|(x, y)| x & !y == 0)
}

struct Prepared {
    ops: Vec<Entry>,
    state_ids: StateIds,
    dropped_unknown_reads: usize,
    dropped_unobserved: usize,
}

fn prepare(history: &[Event], ids: &[usize]) -> Result<Prepared, String> {
    let mut ops = Vec::with_capacity(history.len());
    let mut dropped_unknown_reads = 0;
    for (idx, e) in history.iter().enumerate() {
        let kind = match (&e.op, &e.outcome) {
            (Op::Write { value }, Outcome::WriteOk) => Kind::Write(*value),
            (Op::Write { value }, Outcome::Unknown) => Kind::MaybeWrite(*value),
            (Op::Cas { expected, new }, Outcome::CasResult(true)) => Kind::CasOk(*expected, *new),
            (Op::Cas { expected, .. }, Outcome::CasResult(false)) => Kind::CasFail(*expected),
            (Op::Cas { expected, new }, Outcome::Unknown) => Kind::MaybeCas(*expected, *new),
            (Op::Read, Outcome::ReadValue(v)) => Kind::Read(*v),
            (Op::Read, Outcome::Unknown) => {
                dropped_unknown_reads += 1;
                continue;
            }
            _ => {
                return Err(format!(
                    "malformed history: event #{} has an outcome that does not match its op: {e:?}",
                    ids[idx]
                ))
            }
        };
        let completed = if kind.known() {
            if e.completed < e.invoked {
                return Err(format!("malformed history: event #{} completed before it was invoked: {e:?}", ids[idx]));
            }
            e.completed
        } else {
            u64::MAX
        };
        ops.push(Entry { kind, invoked: e.invoked, completed, idx, a: 0, b: 0 });
    }

    // Unknown write/CAS whose value nobody ever observes can only matter by making a failed CAS
    // fail; if there is no failed CAS, omitting it is always at least as good as including it.
    let mut dropped_unobserved = 0;
    if !ops.iter().any(|o| matches!(o.kind, Kind::CasFail(_))) {
        let mut observed: HashSet<u64, FxBuild> = HashSet::default();
        for o in &ops {
            match o.kind {
                Kind::Read(Some(v)) | Kind::CasOk(Some(v), _) | Kind::MaybeCas(Some(v), _) => {
                    observed.insert(v);
                }
                _ => {}
            }
        }
        let before = ops.len();
        ops.retain(|o| match o.kind {
            Kind::MaybeWrite(v) | Kind::MaybeCas(_, v) => observed.contains(&v),
            _ => true,
        });
        dropped_unobserved = before - ops.len();
    }

    ops.sort_by_key(|o| (o.invoked, o.idx));
    let state_ids = StateIds::new(&ops);
    for o in &mut ops {
        let (a, b) = match o.kind {
            Kind::Read(v) | Kind::CasFail(v) => (state_ids.id(v), 0),
            Kind::Write(v) | Kind::MaybeWrite(v) => (0, state_ids.id(Some(v))),
            Kind::CasOk(e, v) | Kind::MaybeCas(e, v) => (state_ids.id(e), state_ids.id(Some(v))),
        };
        o.a = a;
        o.b = b;
    }
    Ok(Prepared { ops, state_ids, dropped_unknown_reads, dropped_unobserved })
}

fn check_with_ids(initial: Option<u64>, history: &[Event], ids: &[usize]) -> Verdict {
    let prepared = match prepare(history, ids) {
        Ok(p) => p,
        Err(explanation) => return Verdict::NotLinearizable { explanation },
    };
    let mut search = Search::new(&prepared.ops);
    let initial_id = prepared.state_ids.id(initial);
    let hopeless = search.unsatisfiable(initial_id);
    if !hopeless.is_empty() {
        let mut explanation = format!(
            "{} op(s) with known outcome need a register value that is neither the initial value \
             ({initial:?}) nor written by any op in the history:\n",
            hopeless.len()
        );
        for &i in hopeless.iter().take(12) {
            let _ = writeln!(explanation, "  {}", search.describe(i, history, ids));
        }
        if hopeless.len() > 12 {
            let _ = writeln!(explanation, "  ... and {} more", hopeless.len() - 12);
        }
        return Verdict::NotLinearizable { explanation };
    }
    match search.run(initial_id) {
        Ok(()) => Verdict::Linearizable,
        Err(best) => Verdict::NotLinearizable { explanation: search.explain(&best, initial, history, ids, &prepared) },
    }
}

/// Best (deepest) node reached by the search, for the failure explanation.
struct Best {
    /// Number of known-outcome ops linearized.
    done: usize,
    /// Linearization order (indices into `ops`).
    path: Vec<usize>,
    lin: Vec<u64>,
}

struct Frame {
    /// Register state id at this node.
    state: u64,
    /// `path` length before this node's greedy read-only ops.
    base: usize,
    /// Start of this node's choices in the shared `choices` buffer.
    start: usize,
    /// Next choice to try.
    next: usize,
    /// Whether a choice is currently applied (and sits on top of `path`).
    applied: bool,
}

struct Search<'a> {
    ops: &'a [Entry],
    /// Linearized ops (bit per index into `ops`).
    lin: Vec<u64>,
    /// Bit set for every unknown-outcome op (same indexing as `lin`).
    unknown_mask: Vec<u64>,
    /// Ordinal among unknown-outcome ops (`usize::MAX` for known ones).
    unknown_ord: Vec<usize>,
    /// Linearized unknown-outcome ops (bit per unknown ordinal).
    ulin: Vec<u64>,
    /// Known Reads / successful CASes, by the state id they need (index = state id).
    needs: Vec<Vec<usize>>,
    /// Ops that can produce each state id (index = state id).
    writers: Vec<Vec<usize>>,
    known_total: usize,
    known_left: usize,
    explored: usize,
}

impl<'a> Search<'a> {
    fn new(ops: &'a [Entry]) -> Self {
        let words = ops.len().div_ceil(64).max(1);
        let known_total = ops.iter().filter(|o| o.kind.known()).count();
        let mut unknown_mask = vec![0u64; words];
        let mut unknown_ord = vec![usize::MAX; ops.len()];
        let n_ids = ops.iter().map(|o| o.a.max(o.b) as usize + 1).max().unwrap_or(0).max(2);
        let mut needs = vec![Vec::new(); n_ids];
        let mut writers = vec![Vec::new(); n_ids];
        for (i, o) in ops.iter().enumerate() {
            match o.kind {
                Kind::Read(_) => needs[o.a as usize].push(i),
                Kind::CasOk(..) => {
                    needs[o.a as usize].push(i);
                    writers[o.b as usize].push(i);
                }
                Kind::Write(_) | Kind::MaybeWrite(_) | Kind::MaybeCas(..) => writers[o.b as usize].push(i),
                Kind::CasFail(_) => {}
            }
        }
        let mut n_unknown = 0;
        for (i, o) in ops.iter().enumerate() {
            if !o.kind.known() {
                unknown_mask[i >> 6] |= 1u64 << (i & 63);
                unknown_ord[i] = n_unknown;
                n_unknown += 1;
            }
        }
        Search {
            ops,
            lin: vec![0; words],
            unknown_mask,
            unknown_ord,
            ulin: vec![0; n_unknown.div_ceil(64)],
            needs,
            writers,
            known_total,
            known_left: known_total,
            explored: 0,
        }
    }

    #[inline]
    fn is_lin(&self, i: usize) -> bool {
        self.lin[i >> 6] & (1u64 << (i & 63)) != 0
    }

    #[inline]
    fn set(&mut self, i: usize) {
        self.lin[i >> 6] |= 1u64 << (i & 63);
        match self.ops[i].kind {
            Kind::MaybeWrite(_) | Kind::MaybeCas(..) => {
                let u = self.unknown_ord[i];
                self.ulin[u >> 6] |= 1u64 << (u & 63);
            }
            _ => self.known_left -= 1,
        }
    }

    #[inline]
    fn unset(&mut self, i: usize) {
        self.lin[i >> 6] &= !(1u64 << (i & 63));
        match self.ops[i].kind {
            Kind::MaybeWrite(_) | Kind::MaybeCas(..) => {
                let u = self.unknown_ord[i];
                self.ulin[u >> 6] &= !(1u64 << (u & 63));
            }
            _ => self.known_left += 1,
        }
    }

    /// Just-in-time rule for unknown-outcome ops: linearizing unknown op `i` at `state` is only
    /// worth trying if it immediately enables another minimal op that is blocked at `state`: a
    /// Read of its value, a CAS expecting its value, or a failed CAS expecting `state`.
    ///
    /// Why this is enough: take any linearization placing `i` here. Read-only ops right after it
    /// that were already valid at `state` can move before it (`i` never has to precede anything,
    /// its completion being unknown). If the next op then is neither one of the enabled ops above
    /// nor a CAS expecting its value, it is a write, and dropping `i` altogether leaves a valid
    /// linearization. The set of minimal ops does not change by linearizing `i`, so "the next op"
    /// is among the current candidates.
    fn unknown_enables(&self, i: usize, state: u64, cands: &[usize]) -> bool {
        let new = self.ops[i].b;
        new != state
            && cands.iter().any(|&c| {
                let o = &self.ops[c];
                c != i
                    && match o.kind {
                        Kind::Read(_) | Kind::CasOk(..) | Kind::MaybeCas(..) => o.a == new,
                        Kind::CasFail(_) => o.a == state,
                        Kind::Write(_) | Kind::MaybeWrite(_) => false,
                    }
            })
    }

    /// Known ops needing a state id that is not `initial` and that no op can produce.
    fn unsatisfiable(&self, initial: u64) -> Vec<usize> {
        let mut out: Vec<usize> = (0..self.needs.len())
            .filter(|&id| id as u64 != initial && self.writers[id].is_empty())
            .flat_map(|id| self.needs[id].iter().copied())
            .collect();
        out.sort_by_key(|&i| self.ops[i].idx);
        out
    }

    /// After the register left state `left`: is some pending known op stuck forever? That is the
    /// case if it needs `left` but every op that could produce `left` again is already linearized.
    fn stranded(&self, left: u64) -> bool {
        let needs = &self.needs[left as usize];
        !needs.is_empty()
            && needs.iter().any(|&o| !self.is_lin(o))
            && self.writers[left as usize].iter().all(|&w| self.is_lin(w))
    }

    /// Memo key for the known-outcome part of the linearized set plus the register state:
    /// `[full_words, state, words...]` where the leading words in which every known op is
    /// linearized are elided and trailing all-zero words are trimmed.
    fn memo_key(&self, state: u64, key: &mut Vec<u64>) {
        let words = self.lin.len();
        let mut full = 0;
        while full < words && (self.lin[full] | self.unknown_mask[full]) == !0 {
            full += 1;
        }
        let mut end = words;
        while end > full && (self.lin[end - 1] & !self.unknown_mask[end - 1]) == 0 {
            end -= 1;
        }
        key.clear();
        key.push(full as u64);
        key.push(state);
        key.extend((full..end).map(|w| self.lin[w] & !self.unknown_mask[w]));
    }

    fn undo_to(&mut self, path: &mut Vec<usize>, len: usize) {
        while path.len() > len {
            let i = path.pop().expect("path longer than len");
            self.unset(i);
        }
    }

    /// All not-yet-linearized ops that may be linearized next (minimal ops), in invocation order.
    ///
    /// Ops are sorted by invocation, so op `i` is minimal iff it was invoked no later than the
    /// earliest completion among the unlinearized known ops *before* it (ops after it complete no
    /// earlier than it was invoked); once one op fails that test, all later ones do too.
    fn candidates(&self, out: &mut Vec<usize>) {
        out.clear();
        let n = self.ops.len();
        let mut min_comp = u64::MAX;
        for (wi, &word) in self.lin.iter().enumerate() {
            let mut free = !word;
            while free != 0 {
                let i = wi * 64 + free.trailing_zeros() as usize;
                free &= free - 1;
                if i >= n {
                    return;
                }
                let e = &self.ops[i];
                if e.invoked > min_comp {
                    return;
                }
                out.push(i);
                min_comp = min_comp.min(e.completed);
            }
        }
    }

    /// Whether node (current set, `state`) was visited before, counting a visited node with a
    /// subset of the currently linearized unknown-outcome ops as covering this one (unlinearized
    /// unknown ops never constrain anything, so having linearized fewer of them is never worse).
    /// Records the node if not.
    fn visited(&self, state: u64, memo: &mut Memo, key: &mut Vec<u64>) -> bool {
        self.memo_key(state, key);
        if self.ulin.is_empty() {
            // No unknown-outcome ops: a plain visited set, without subset lists to allocate.
            if memo.contains_key(&key[..]) {
                return true;
            }
            memo.insert(key[..].into(), Vec::new());
            return false;
        }
        match memo.get_mut(&key[..]) {
            Some(subsets) => {
                if subsets.iter().any(|t| is_subset(t, &self.ulin)) {
                    return true;
                }
                subsets.retain(|t| !is_subset(&self.ulin, t));
                subsets.push(self.ulin[..].into());
            }
            None => {
                memo.insert(key[..].into(), vec![self.ulin[..].into()]);
            }
        }
        false
    }

    fn run(&mut self, initial: u64) -> Result<(), Best> {
        let mut memo: Memo = HashMap::default();
        let mut stack: Vec<Frame> = Vec::new();
        let mut path: Vec<usize> = Vec::new();
        let mut choices: Vec<usize> = Vec::new();
        let mut cands: Vec<usize> = Vec::new();
        let mut key: Vec<u64> = Vec::with_capacity(self.lin.len() + 2);
        let mut best: Option<Best> = None;
        // Node to enter next: (its state, the state just left to reach it).
        let mut enter = Some((initial, None));

        loop {
            if let Some((state, left)) = enter.take() {
                self.explored += 1;
                let base = path.len();
                // Greedily linearize minimal read-only ops consistent with the state.
                loop {
                    self.candidates(&mut cands);
                    let mut progressed = false;
                    for &i in &cands {
                        let o = &self.ops[i];
                        let ok = match o.kind {
                            Kind::Read(_) => o.a == state,
                            Kind::CasFail(_) => o.a != state,
                            _ => false,
                        };
                        if ok {
                            self.set(i);
                            path.push(i);
                            progressed = true;
                        }
                    }
                    if !progressed {
                        break;
                    }
                }
                if self.known_left == 0 {
                    return Ok(());
                }
                let done = self.known_total - self.known_left;
                if best.as_ref().is_none_or(|b| done > b.done) {
                    best = Some(Best { done, path: path.clone(), lin: self.lin.clone() });
                }
                // Dead end if the register left a value for good that a pending op still needs,
                // or if this node was explored before.
                let dead = left.is_some_and(|l: u64| l != state && self.stranded(l))
                    || self.visited(state, &mut memo, &mut key);
                if dead {
                    self.undo_to(&mut path, base);
                } else {
                    let start = choices.len();
                    // State-changing ops valid here; known ones first (unknown ones are optional).
                    for want_known in [true, false] {
                        for &i in &cands {
                            let o = &self.ops[i];
                            if o.kind.known() != want_known {
                                continue;
                            }
                            let valid = match o.kind {
                                Kind::Write(_) => true,
                                Kind::CasOk(..) => o.a == state,
                                Kind::MaybeWrite(_) => self.unknown_enables(i, state, &cands),
                                Kind::MaybeCas(..) => o.a == state && self.unknown_enables(i, state, &cands),
                                Kind::Read(_) | Kind::CasFail(_) => false,
                            };
                            if valid {
                                choices.push(i);
                            }
                        }
                    }
                    stack.push(Frame { state, base, start, next: start, applied: false });
                }
            }

            let Some(top) = stack.last_mut() else {
                return Err(best.expect("at least one node is always explored"));
            };
            if top.applied {
                let i = path.pop().expect("applied op on path");
                self.unset(i);
                top.applied = false;
            }
            // Children truncate their choices on exit, so the buffer ends where this frame's do.
            if top.next < choices.len() {
                let i = choices[top.next];
                top.next += 1;
                top.applied = true;
                self.set(i);
                path.push(i);
                enter = Some((self.ops[i].b, Some(top.state)));
            } else {
                let frame = stack.pop().expect("non-empty stack");
                choices.truncate(frame.start);
                self.undo_to(&mut path, frame.base);
            }
        }
    }

    fn describe(&self, i: usize, history: &[Event], ids: &[usize]) -> String {
        let o = &self.ops[i];
        let e = &history[o.idx];
        let completed = if o.kind.known() { e.completed.to_string() } else { "?".to_string() };
        format!("#{} client {} {:?} -> {:?} [{}..{}]", ids[o.idx], e.client, e.op, e.outcome, e.invoked, completed)
    }

    fn explain(
        &mut self,
        best: &Best,
        initial: Option<u64>,
        history: &[Event],
        ids: &[usize],
        prepared: &Prepared,
    ) -> String {
        const MAX_STEPS: usize = 12;
        const MAX_LINES: usize = 12;
        let mut s = String::new();
        let unknown = self.ops.len() - self.known_total;
        let _ = writeln!(
            s,
            "no linearization exists (initial value {initial:?}; {} ops checked: {} with known outcome, \
             {unknown} unknown; ignored {} unknown reads and {} unobservable unknown writes/CASes; \
             {} search states explored).",
            self.ops.len(),
            self.known_total,
            prepared.dropped_unknown_reads,
            prepared.dropped_unobserved,
            self.explored
        );

        // Replay the best path to know the state after each step.
        let mut states = Vec::with_capacity(best.path.len());
        let mut st = initial;
        for &i in &best.path {
            if let Some(v) = self.ops[i].kind.new_value() {
                st = Some(v);
            }
            states.push(st);
        }
        let _ = writeln!(
            s,
            "Longest linearizable prefix found places {}/{} known-outcome ops ({} steps incl. unknown-outcome ops); \
             its last {} steps:",
            best.done,
            self.known_total,
            best.path.len(),
            best.path.len().min(MAX_STEPS)
        );
        if best.path.is_empty() {
            let _ = writeln!(s, "  (empty)");
        }
        let skip = best.path.len().saturating_sub(MAX_STEPS);
        for (k, &i) in best.path.iter().enumerate().skip(skip) {
            let _ = writeln!(s, "  {}. {}  => register {:?}", k + 1, self.describe(i, history, ids), states[k]);
        }
        let state = states.last().copied().unwrap_or(initial);
        let _ = writeln!(s, "Register after that prefix: {state:?}.");

        // What could not go next at that point, and why.
        self.lin.clone_from(&best.lin);
        let mut cands = Vec::new();
        self.candidates(&mut cands);
        let _ = writeln!(s, "Known-outcome ops that may go next there but cannot be placed:");
        let mut lines = 0;
        let mut unknown_cands = 0;
        for &i in &cands {
            let kind = self.ops[i].kind;
            let gone = || {
                if self.writers[self.ops[i].a as usize].iter().all(|&w| self.is_lin(w)) {
                    " (and no remaining op can write that value again)"
                } else {
                    ""
                }
            };
            let reason = match kind {
                Kind::Read(v) => format!("read returned {v:?} but the register holds {state:?}{}", gone()),
                Kind::CasFail(e) => {
                    format!("CAS reported failure but the register holds its expected value {e:?}")
                }
                Kind::CasOk(e, _) if e != state => {
                    format!("CAS reported success but the register holds {state:?}, not {e:?}{}", gone())
                }
                Kind::Write(_) | Kind::CasOk(..) => "placeable, but every continuation after it dead-ends".to_string(),
                Kind::MaybeWrite(_) | Kind::MaybeCas(..) => {
                    unknown_cands += 1;
                    continue;
                }
            };
            lines += 1;
            if lines <= MAX_LINES {
                let _ = writeln!(s, "  {}: {reason}", self.describe(i, history, ids));
            }
        }
        if lines > MAX_LINES {
            let _ = writeln!(s, "  ... and {} more", lines - MAX_LINES);
        }
        if unknown_cands > 0 {
            let _ = writeln!(s, "  ({unknown_cands} unknown-outcome ops could also go next; no choice of them helps)");
        }

        // Known ops not yet minimal: they must wait for the earliest-completing pending op.
        let blocker = (0..self.ops.len())
            .filter(|&i| !self.is_lin(i) && self.ops[i].kind.known())
            .min_by_key(|&i| (self.ops[i].completed, i));
        let waiting: Vec<usize> = (0..self.ops.len())
            .filter(|&i| !self.is_lin(i) && self.ops[i].kind.known() && !cands.contains(&i))
            .collect();
        if let (Some(b), false) = (blocker, waiting.is_empty()) {
            let _ = writeln!(
                s,
                "{} further known-outcome ops were invoked after {} completed and must follow it; first: {}",
                waiting.len(),
                self.describe(b, history, ids),
                self.describe(waiting[0], history, ids)
            );
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn w(client: usize, value: u64, invoked: u64, completed: u64) -> Event {
        Event { client, op: Op::Write { value }, outcome: Outcome::WriteOk, invoked, completed }
    }
    fn w_unknown(client: usize, value: u64, invoked: u64) -> Event {
        Event { client, op: Op::Write { value }, outcome: Outcome::Unknown, invoked, completed: invoked }
    }
    fn r(client: usize, value: Option<u64>, invoked: u64, completed: u64) -> Event {
        Event { client, op: Op::Read, outcome: Outcome::ReadValue(value), invoked, completed }
    }
    fn r_unknown(client: usize, invoked: u64) -> Event {
        Event { client, op: Op::Read, outcome: Outcome::Unknown, invoked, completed: invoked }
    }
    fn cas(client: usize, expected: Option<u64>, new: u64, ok: bool, invoked: u64, completed: u64) -> Event {
        Event { client, op: Op::Cas { expected, new }, outcome: Outcome::CasResult(ok), invoked, completed }
    }
    fn cas_unknown(client: usize, expected: Option<u64>, new: u64, invoked: u64) -> Event {
        Event { client, op: Op::Cas { expected, new }, outcome: Outcome::Unknown, invoked, completed: invoked }
    }

    fn assert_lin(initial: Option<u64>, h: &[Event]) {
        match check(initial, h) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable { explanation } => {
                panic!("expected linearizable, got:\n{explanation}\nhistory: {h:#?}")
            }
        }
    }
    fn assert_not_lin(initial: Option<u64>, h: &[Event]) -> String {
        match check(initial, h) {
            Verdict::Linearizable => panic!("expected NOT linearizable: {h:#?}"),
            Verdict::NotLinearizable { explanation } => explanation,
        }
    }

    #[test]
    fn empty_history() {
        assert_lin(None, &[]);
        assert_lin(Some(3), &[]);
    }

    #[test]
    fn sequential_valid_history() {
        let h = vec![
            r(0, None, 0, 1),
            w(0, 1, 2, 3),
            r(1, Some(1), 4, 5),
            cas(0, Some(1), 2, true, 6, 7),
            cas(1, Some(1), 3, false, 8, 9),
            r(1, Some(2), 10, 11),
            w(2, 4, 12, 13),
            cas(2, Some(4), 5, true, 14, 15),
            r(0, Some(5), 16, 17),
        ];
        assert_lin(None, &h);
        // Same history from the wrong initial value fails at the first read.
        let expl = assert_not_lin(Some(9), &h);
        assert!(expl.contains("neither the initial value"), "{expl}");
        assert!(expl.contains("#0 client 0 Read -> ReadValue(None)"), "{expl}");
        // The initial value cannot come back once overwritten: found by the search.
        let expl = assert_not_lin(Some(9), &[r(0, Some(9), 0, 1), w(1, 5, 2, 3), r(0, Some(9), 4, 5)]);
        assert!(expl.contains("read returned Some(9) but the register holds Some(5) (and no remaining op"), "{expl}");
    }

    #[test]
    fn initial_value_is_respected() {
        assert_lin(Some(7), &[r(0, Some(7), 0, 1), cas(0, Some(7), 8, true, 2, 3), r(1, Some(8), 4, 5)]);
        assert_not_lin(None, &[r(0, Some(7), 0, 1)]);
    }

    #[test]
    fn stale_read_after_completed_write_fails() {
        let h = vec![w(0, 1, 0, 10), w(0, 2, 20, 30), r(1, Some(1), 40, 50)];
        let expl = assert_not_lin(None, &h);
        assert!(expl.contains("read returned Some(1) but the register holds Some(2)"), "{expl}");
        assert!(expl.contains("#2 client 1 Read"), "{expl}");
        // Reading the initial (absent) value after an acknowledged write is stale too.
        assert_not_lin(None, &[w(0, 1, 0, 10), r(1, None, 11, 12)]);
    }

    #[test]
    fn concurrent_write_and_read_either_order() {
        // Read overlaps the write: may see the old or the new value.
        assert_lin(None, &[w(0, 1, 0, 10), r(1, None, 5, 15)]);
        assert_lin(None, &[w(0, 1, 0, 10), r(1, Some(1), 5, 15)]);
        // Read entirely inside the write.
        assert_lin(None, &[w(0, 1, 0, 100), r(1, Some(1), 10, 20), r(2, Some(1), 30, 40)]);
        // But once a read saw the new value, a later read may not see the old one.
        assert_not_lin(None, &[w(0, 1, 0, 100), r(1, Some(1), 10, 20), r(2, None, 30, 40)]);
        // Two concurrent writes, readers afterwards agree on either winner.
        assert_lin(None, &[w(0, 1, 0, 10), w(1, 2, 0, 10), r(2, Some(1), 20, 30)]);
        assert_lin(None, &[w(0, 1, 0, 10), w(1, 2, 0, 10), r(2, Some(2), 20, 30)]);
        // Readers after both writes completed cannot disagree.
        assert_not_lin(None, &[w(0, 1, 0, 10), w(1, 2, 0, 10), r(2, Some(1), 20, 30), r(3, Some(2), 40, 50)]);
        // Long write overlapping a later short write: may be ordered after it.
        assert_lin(None, &[w(0, 1, 0, 100), w(1, 2, 10, 20), r(2, Some(1), 30, 40)]);
    }

    #[test]
    fn equal_timestamps_are_concurrent() {
        // Read invoked exactly when the write completed: may still see the old value.
        assert_lin(None, &[w(0, 1, 0, 10), r(1, None, 10, 20)]);
        assert_not_lin(None, &[w(0, 1, 0, 10), r(1, None, 11, 20)]);
    }

    #[test]
    fn cas_consistent_cases() {
        // Success from absent, failure when value differs.
        assert_lin(
            None,
            &[
                cas(0, None, 1, true, 0, 10),
                cas(1, None, 2, false, 20, 30),
                cas(1, Some(1), 2, true, 40, 50),
                r(0, Some(2), 60, 70),
            ],
        );
        // Two concurrent CASes from the same expected value: one wins, one loses.
        assert_lin(None, &[cas(0, None, 1, true, 0, 10), cas(1, None, 2, false, 0, 10), r(2, Some(1), 20, 30)]);
        // A failed CAS concurrent with a write may be ordered after it.
        assert_lin(None, &[w(0, 1, 0, 10), cas(1, None, 2, false, 5, 8), r(2, Some(1), 20, 30)]);
    }

    #[test]
    fn cas_inconsistent_cases() {
        // Both concurrent CASes from None claim success.
        let expl = assert_not_lin(None, &[cas(0, None, 1, true, 0, 10), cas(1, None, 2, true, 0, 10)]);
        assert!(expl.contains("CAS reported success"), "{expl}");
        // CAS fails although the register held the expected value (nothing concurrent).
        let expl = assert_not_lin(None, &[w(0, 1, 0, 10), cas(1, Some(1), 2, false, 20, 30)]);
        assert!(expl.contains("CAS reported failure"), "{expl}");
        // CAS succeeded but a later read does not see its value.
        assert_not_lin(None, &[w(0, 1, 0, 10), cas(1, Some(1), 2, true, 20, 30), r(2, Some(1), 40, 50)]);
        // CAS succeeds on a value that was never there.
        assert_not_lin(None, &[w(0, 1, 0, 10), cas(1, Some(7), 2, true, 20, 30)]);
        // Failed CAS from None with no concurrent writer.
        assert_not_lin(None, &[cas(0, None, 1, false, 0, 10)]);
    }

    #[test]
    fn lost_acknowledged_write_fails() {
        let h = vec![
            w(0, 1, 0, 10),
            r(1, Some(1), 20, 30),
            w(0, 2, 40, 50),
            r(1, Some(2), 60, 70),
            w(2, 3, 80, 90),         // acknowledged ...
            r(1, Some(2), 100, 110), // ... but lost.
            r(0, Some(2), 120, 130),
        ];
        let expl = assert_not_lin(None, &h);
        assert!(expl.contains("Some(2) but the register holds Some(3)"), "{expl}");
        assert!(expl.contains("places 5/7"), "{expl}");
    }

    #[test]
    fn unknown_write_observed_later_passes() {
        let h = vec![w(0, 1, 0, 10), w_unknown(1, 2, 20), r(2, Some(1), 30, 40), r(2, Some(2), 1000, 1010)];
        assert_lin(None, &h);
        // The unknown write may take effect long after later ops of other clients.
        assert_lin(None, &[w_unknown(0, 5, 0), w(1, 6, 10, 20), r(2, Some(5), 30, 40)]);
        // ... but only once: after its value was overwritten by 6 it cannot reappear.
        assert_not_lin(
            None,
            &[w_unknown(0, 5, 0), r(2, Some(5), 5, 8), w(1, 6, 10, 20), r(2, Some(6), 30, 40), r(2, Some(5), 50, 60)],
        );
        // It may not take effect before it was invoked.
        assert_not_lin(None, &[r(2, Some(5), 0, 10), w_unknown(0, 5, 20)]);
    }

    #[test]
    fn unknown_write_never_observed_passes() {
        assert_lin(None, &[w(0, 1, 0, 10), w_unknown(1, 2, 20), r(2, Some(1), 30, 40), r(2, Some(1), 50, 60)]);
        assert_lin(None, &[w_unknown(1, 2, 0)]);
        // Unobserved unknown write that is needed to explain a failed CAS.
        assert_lin(None, &[w_unknown(0, 5, 0), cas(1, None, 1, false, 10, 20)]);
        // ... and then the register must hold 5 (not None).
        assert_not_lin(None, &[w_unknown(0, 5, 0), cas(1, None, 1, false, 10, 20), r(1, None, 30, 40)]);
    }

    #[test]
    fn unknown_reads_are_ignored() {
        assert_lin(None, &[w(0, 1, 0, 10), r_unknown(1, 20), r(2, Some(1), 30, 40)]);
    }

    #[test]
    fn unknown_cas() {
        // Applied: its value is observed.
        assert_lin(None, &[w(0, 1, 0, 10), cas_unknown(1, Some(1), 2, 20), r(2, Some(2), 30, 40)]);
        // Not applied.
        assert_lin(None, &[w(0, 1, 0, 10), cas_unknown(1, Some(1), 2, 20), r(2, Some(1), 30, 40)]);
        // Its precondition never held, so its value can never be observed.
        assert_not_lin(None, &[w(0, 1, 0, 10), cas_unknown(1, Some(7), 2, 20), r(2, Some(2), 30, 40)]);
        // Precondition holds only after a later write: unknown CAS may apply then.
        assert_lin(None, &[cas_unknown(1, Some(3), 2, 0), w(0, 3, 10, 20), r(2, Some(2), 30, 40)]);
        // Unknown CAS applied, then a known CAS builds on it.
        assert_lin(
            None,
            &[w(0, 1, 0, 10), cas_unknown(1, Some(1), 2, 20), cas(0, Some(2), 3, true, 30, 40), r(2, Some(3), 50, 60)],
        );
        // Unknown CAS explains a failed CAS.
        assert_lin(None, &[w(0, 1, 0, 10), cas_unknown(1, Some(1), 2, 20), cas(2, Some(1), 3, false, 30, 40)]);
    }

    #[test]
    fn malformed_events_are_reported() {
        let bad = Event { client: 0, op: Op::Read, outcome: Outcome::WriteOk, invoked: 0, completed: 1 };
        let expl = assert_not_lin(None, &[bad]);
        assert!(expl.contains("malformed"), "{expl}");
        let expl = assert_not_lin(None, &[w(0, 1, 10, 5)]);
        assert!(expl.contains("completed before it was invoked"), "{expl}");
    }

    #[test]
    fn check_by_key_splits_and_names_failing_key() {
        let ok = vec![
            ("a".to_string(), w(0, 1, 0, 10)),
            ("b".to_string(), w(1, 2, 0, 10)),
            ("a".to_string(), r(2, Some(1), 20, 30)),
            ("b".to_string(), r(2, Some(2), 20, 30)),
            ("c".to_string(), r(3, None, 0, 5)),
        ];
        assert_eq!(check_by_key(&ok), Ok(()));
        let mut bad = ok.clone();
        // On key "b", a read returns key "a"'s value.
        bad.push(("b".to_string(), r(3, Some(1), 40, 50)));
        let err = check_by_key(&bad).expect_err("the corrupted history must fail");
        assert!(err.contains("key \"b\""), "{err}");
        assert!(err.contains("#5 client 3 Read"), "global event index expected: {err}");
        assert_eq!(check_by_key(&[]), Ok(()));
    }

    #[test]
    fn long_sequential_history_does_not_overflow_stack() {
        let mut h = Vec::new();
        let mut t = 0;
        for v in 1..=20_000u64 {
            h.push(w(0, v, t, t + 1));
            h.push(r(1, Some(v), t + 2, t + 3));
            t += 4;
        }
        assert_lin(None, &h);
        h.last_mut().expect("non-empty").outcome = Outcome::ReadValue(Some(1));
        assert_not_lin(None, &h);
    }

    // --- Randomized ---------------------------------------------------------------------------------

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Simulates a correct atomic register: every op gets a real-time interval and a linearization
    /// point inside it (unknown ops: any point after invocation, or never), ops are executed in
    /// linearization-point order, and outcomes are recorded.
    fn simulate(seed: u64, clients: usize, per_client: usize, unknown_pct: u64) -> Vec<Event> {
        let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        struct Planned {
            client: usize,
            invoked: u64,
            completed: u64,
            lp: u64,
            unknown: bool,
        }
        let mut planned = Vec::new();
        for client in 0..clients {
            let mut t = rng.below(50);
            for _ in 0..per_client {
                let invoked = t + rng.below(10);
                let unknown = rng.below(100) < unknown_pct;
                let (lp, completed) = if unknown {
                    // Client times out after 60; the op may land much later.
                    (invoked + rng.below(400), invoked + 60)
                } else {
                    let lp = invoked + rng.below(40);
                    (lp, lp + rng.below(40))
                };
                planned.push(Planned { client, invoked, completed, lp, unknown });
                t = completed + 1;
            }
        }
        let mut order: Vec<usize> = (0..planned.len()).collect();
        order.sort_by_key(|&i| (planned[i].lp, i));
        let mut state: Option<u64> = None;
        let mut next_val = 1u64;
        let mut events: Vec<Option<Event>> = vec![None; planned.len()];
        for i in order {
            let p = &planned[i];
            let takes_effect = !p.unknown || rng.below(2) == 0;
            let (op, outcome) = match rng.below(10) {
                0..=3 => (Op::Read, if p.unknown { Outcome::Unknown } else { Outcome::ReadValue(state) }),
                4..=6 => {
                    let value = next_val;
                    next_val += 1;
                    if takes_effect {
                        state = Some(value);
                    }
                    (Op::Write { value }, if p.unknown { Outcome::Unknown } else { Outcome::WriteOk })
                }
                _ => {
                    let expected = if rng.below(10) < 6 {
                        state
                    } else {
                        match rng.below(next_val) {
                            0 => None,
                            v => Some(v),
                        }
                    };
                    let new = next_val;
                    next_val += 1;
                    let ok = state == expected;
                    if ok && takes_effect {
                        state = Some(new);
                    }
                    (Op::Cas { expected, new }, if p.unknown { Outcome::Unknown } else { Outcome::CasResult(ok) })
                }
            };
            events[i] = Some(Event { client: p.client, op, outcome, invoked: p.invoked, completed: p.completed });
        }
        events.into_iter().map(|e| e.expect("every planned op executed")).collect()
    }

    /// Corrupts one known read to a value that was never written.
    fn corrupt_fresh(h: &mut [Event], rng: &mut XorShift) -> bool {
        let reads: Vec<usize> = (0..h.len()).filter(|&i| matches!(h[i].outcome, Outcome::ReadValue(_))).collect();
        if reads.is_empty() {
            return false;
        }
        let i = reads[rng.below(reads.len() as u64) as usize];
        h[i].outcome = Outcome::ReadValue(Some(999_999_999));
        true
    }

    /// Corrupts one known read to return the value of a write W1 that was definitely overwritten
    /// before the read began: W1 completed before a known state-changing W2 was invoked, and W2
    /// completed before the read was invoked.
    fn corrupt_stale(h: &mut [Event]) -> bool {
        let writes: Vec<(u64, u64, u64)> = h
            .iter()
            .filter_map(|e| match (&e.op, &e.outcome) {
                (Op::Write { value }, Outcome::WriteOk) => Some((*value, e.invoked, e.completed)),
                (Op::Cas { new, .. }, Outcome::CasResult(true)) => Some((*new, e.invoked, e.completed)),
                _ => None,
            })
            .collect();
        for ri in (0..h.len()).rev() {
            let Outcome::ReadValue(seen) = h[ri].outcome else { continue };
            let r_inv = h[ri].invoked;
            for w2 in writes.iter().filter(|w2| w2.2 < r_inv) {
                if let Some(w1) = writes.iter().find(|w1| w1.2 < w2.1 && Some(w1.0) != seen) {
                    h[ri].outcome = Outcome::ReadValue(Some(w1.0));
                    return true;
                }
            }
        }
        false
    }

    #[test]
    fn randomized_correct_register_is_linearizable_and_corruption_is_caught() {
        for seed in 1..=30u64 {
            let h = simulate(seed, 8, 64, if seed % 3 == 0 { 0 } else { 5 });
            assert!(h.len() >= 500);
            let start = Instant::now();
            assert_lin(None, &h);
            assert!(start.elapsed().as_secs() < 5, "seed {seed} too slow: {:?}", start.elapsed());

            let mut rng = XorShift(seed + 1000);
            let mut bad = h.clone();
            assert!(corrupt_fresh(&mut bad, &mut rng));
            let expl = assert_not_lin(None, &bad);
            assert!(expl.contains("Some(999999999)"), "seed {seed}: {expl}");

            let mut stale = h.clone();
            assert!(corrupt_stale(&mut stale), "seed {seed}: no stale candidate");
            assert_not_lin(None, &stale);
        }
    }

    /// Plain exhaustive WGL search without memo or pruning: the reference for small histories.
    fn brute_force(initial: Option<u64>, h: &[Event]) -> bool {
        fn rec(ops: &[&Event], done: &mut [bool], state: Option<u64>) -> bool {
            let known = |e: &Event| e.outcome != Outcome::Unknown;
            if ops.iter().zip(done.iter()).all(|(e, &d)| d || !known(e)) {
                return true;
            }
            for i in 0..ops.len() {
                if done[i] {
                    continue;
                }
                let must_wait =
                    (0..ops.len()).any(|j| j != i && !done[j] && known(ops[j]) && ops[j].completed < ops[i].invoked);
                if must_wait {
                    continue;
                }
                let next = match (&ops[i].op, &ops[i].outcome) {
                    (Op::Write { value }, _) => Some(Some(*value)),
                    (Op::Cas { expected, new }, Outcome::CasResult(true) | Outcome::Unknown) => {
                        (state == *expected).then_some(Some(*new))
                    }
                    (Op::Cas { expected, .. }, _) => (state != *expected).then_some(state),
                    (Op::Read, Outcome::ReadValue(v)) => (state == *v).then_some(state),
                    (Op::Read, _) => unreachable!("unknown reads are filtered out"),
                };
                if let Some(next) = next {
                    done[i] = true;
                    if rec(ops, done, next) {
                        return true;
                    }
                    done[i] = false;
                }
            }
            false
        }
        let ops: Vec<&Event> = h.iter().filter(|e| !(e.op == Op::Read && e.outcome == Outcome::Unknown)).collect();
        rec(&ops, &mut vec![false; ops.len()], initial)
    }

    #[test]
    fn cross_check_against_brute_force_on_small_histories() {
        let (mut yes, mut no) = (0, 0);
        for seed in 1..=4000u64 {
            let mut rng = XorShift(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
            let clients = 2 + rng.below(3) as usize;
            let per_client = 1 + rng.below(3) as usize;
            let mut h = simulate(seed, clients, per_client, 25);
            let max_val = h.len() as u64 + 1;
            // Mutate a few events so that both verdicts occur.
            for _ in 0..rng.below(3) {
                let i = rng.below(h.len() as u64) as usize;
                match rng.below(4) {
                    0 => {
                        if h[i].op == Op::Read {
                            let v = rng.below(max_val);
                            h[i].outcome = Outcome::ReadValue(if v == 0 { None } else { Some(v) });
                        }
                    }
                    1 => {
                        if let Outcome::CasResult(ok) = h[i].outcome {
                            h[i].outcome = Outcome::CasResult(!ok);
                        }
                    }
                    2 => h[i].outcome = Outcome::Unknown,
                    _ => {
                        let t = rng.below(300);
                        h[i].invoked = t;
                        h[i].completed = t + rng.below(60);
                    }
                }
            }
            let initial = if rng.below(4) == 0 { Some(max_val + 7) } else { None };
            let expected = brute_force(initial, &h);
            let verdict = check(initial, &h);
            assert_eq!(verdict.is_linearizable(), expected, "seed {seed}: {verdict:?}\n{h:#?}");
            if expected {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(yes > 500 && no > 500, "unbalanced cross-check: {yes} linearizable, {no} not");
    }

    #[test]
    fn randomized_small_histories_with_many_unknowns() {
        for seed in 100..400u64 {
            let h = simulate(seed, 4, 8, 30);
            assert_lin(None, &h);
            let mut bad = h.clone();
            let mut rng = XorShift(seed);
            if corrupt_fresh(&mut bad, &mut rng) {
                assert_not_lin(None, &bad);
            }
        }
    }

    #[test]
    fn performance_2000_events_16_clients() {
        for (seed, unknown_pct) in [(7u64, 0u64), (8, 3)] {
            let h = simulate(seed, 16, 125, unknown_pct);
            assert_eq!(h.len(), 2000);
            let start = Instant::now();
            assert_lin(None, &h);
            let ok_time = start.elapsed();

            let mut bad = h.clone();
            let mut rng = XorShift(seed);
            assert!(corrupt_fresh(&mut bad, &mut rng));
            let start = Instant::now();
            assert_not_lin(None, &bad);
            let bad_time = start.elapsed();

            let mut stale = h.clone();
            assert!(corrupt_stale(&mut stale));
            let start = Instant::now();
            assert_not_lin(None, &stale);
            let stale_time = start.elapsed();

            eprintln!(
                "perf seed {seed} unknown {unknown_pct}%: linearizable in {ok_time:?}, \
                 corrupted in {bad_time:?}, stale in {stale_time:?}"
            );
            for t in [ok_time, bad_time, stale_time] {
                assert!(t.as_millis() < 2000, "too slow: {t:?}");
            }
        }
    }
}
