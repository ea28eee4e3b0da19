//! Reading a ledger: entries up to the LAC the reader learned (or a closed ledger's last
//! entry), never beyond, so a reader never sees an entry that recovery might cut off. Entries
//! are fetched in batches per bookie; a failed or missing copy is tried on the next replica of
//! its write set, and every payload's checksum is verified.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use magnetar_proto::bookie::{Code, ReadLacRequest, ReadRequest};

use super::metadata::{LedgerMetadata, LedgerState};
use super::{Ctx, LedgerError};
use crate::checksum::entry_checksum;

/// Entries per read request.
const BATCH: usize = 256;

/// A reader of one ledger.
pub struct LedgerReader {
    ctx: Arc<Ctx>,
    md: LedgerMetadata,
    lac: i64,
}

impl LedgerReader {
    pub(crate) fn new(ctx: Arc<Ctx>, md: LedgerMetadata, lac: i64) -> Self {
        let lac = if md.state == LedgerState::Closed { md.last_entry } else { lac };
        LedgerReader { ctx, md, lac }
    }

    /// The metadata the reader works from.
    pub fn metadata(&self) -> &LedgerMetadata {
        &self.md
    }

    /// The highest entry this reader may read.
    pub fn lac(&self) -> i64 {
        self.lac
    }

    /// Asks the last fragment's bookies for the LAC (an open ledger) and raises the reader's.
    pub async fn refresh_lac(&mut self) -> Result<i64, LedgerError> {
        if self.md.state == LedgerState::Closed {
            return Ok(self.lac);
        }
        let frag = self.md.last_fragment().clone();
        // Entries before the last fragment were confirmed when it was created.
        let mut best = self.lac.max(frag.first_entry - 1);
        let mut futs: FuturesUnordered<_> = frag
            .bookies
            .iter()
            .map(|b| {
                let (ctx, b, id) = (self.ctx.clone(), b.clone(), self.md.id);
                async move {
                    let mut c = ctx.bookies.client(&b).await?;
                    let r =
                        tokio::time::timeout(ctx.opts.read_timeout, c.read_lac(ReadLacRequest { ledger_id: id })).await;
                    match r {
                        Ok(Ok(resp)) if resp.get_ref().code == Code::Ok as i32 => Ok(resp.into_inner().lac),
                        _ => Err(LedgerError::Bookie { bookie: b, reason: "read LAC failed".into() }),
                    }
                }
            })
            .collect();
        while let Some(r) = futs.next().await {
            if let Ok(lac) = r {
                best = best.max(lac);
            }
        }
        self.lac = best;
        Ok(best)
    }

    /// Entries `first..=last` in order; `last` must not pass the LAC.
    pub async fn read(&self, first: i64, last: i64) -> Result<Vec<Bytes>, LedgerError> {
        if first < 0 || last < first {
            return Err(LedgerError::Invalid(format!("bad range {first}..={last}")));
        }
        if last > self.lac {
            return Err(LedgerError::BeyondLac { ledger: self.md.id, entry: last, lac: self.lac });
        }
        read_entries(&self.ctx, &self.md, first, last).await
    }
}

/// Reads `first..=last` of a ledger from its replicas, without a LAC check.
pub(crate) async fn read_entries(
    ctx: &Arc<Ctx>,
    md: &LedgerMetadata,
    first: i64,
    last: i64,
) -> Result<Vec<Bytes>, LedgerError> {
    let n = (last - first + 1) as usize;
    let mut out: Vec<Option<Bytes>> = vec![None; n];
    let mut errors: Vec<String> = vec![String::new(); n];
    for round in 0..md.write_quorum {
        let mut groups: HashMap<String, Vec<i64>> = HashMap::new();
        for (i, slot) in out.iter().enumerate() {
            if slot.is_none() {
                let e = first + i as i64;
                let ws = md.write_set(e);
                // Spread first attempts over the write set, then walk it.
                let b = ws[(e as usize + round) % ws.len()].clone();
                groups.entry(b).or_default().push(e);
            }
        }
        if groups.is_empty() {
            break;
        }
        let mut futs = FuturesUnordered::new();
        for (b, ids) in groups {
            for chunk in ids.chunks(BATCH) {
                let (ctx, b, chunk, id) = (ctx.clone(), b.clone(), chunk.to_vec(), md.id);
                futs.push(async move {
                    // A bookie answers at most so many bytes at once and marks the rest
                    // `NOT_SENT`: those are asked for again, from the same bookie, as long as
                    // each answer brings some entries.
                    let mut got = Vec::with_capacity(chunk.len());
                    let mut ask = chunk.clone();
                    let r = loop {
                        let resp = async {
                            let mut c = ctx.bookies.client(&b).await?;
                            let req = ReadRequest {
                                ledger_id: id,
                                entry_ids: ask.clone(),
                                fence: false,
                                master_key: Bytes::new(),
                            };
                            match tokio::time::timeout(ctx.opts.read_timeout, c.read(req)).await {
                                Ok(Ok(r)) => Ok(r.into_inner()),
                                Ok(Err(s)) => {
                                    Err(LedgerError::Bookie { bookie: b.clone(), reason: s.message().to_owned() })
                                }
                                Err(_) => {
                                    Err(LedgerError::Bookie { bookie: b.clone(), reason: "read timed out".into() })
                                }
                            }
                        }
                        .await;
                        let entries = match resp {
                            Ok(r) => r.entries,
                            Err(e) => break Err(e),
                        };
                        let (later, answered): (Vec<_>, Vec<_>) =
                            entries.into_iter().partition(|er| er.code == Code::NotSent as i32);
                        let progress = !answered.is_empty();
                        got.extend(answered);
                        if later.is_empty() || !progress {
                            got.extend(later);
                            break Ok(got);
                        }
                        ask = later.iter().map(|er| er.entry_id).collect();
                    };
                    (b, chunk, r)
                });
            }
        }
        while let Some((b, chunk, r)) = futs.next().await {
            match r {
                Ok(entries) => {
                    for er in entries {
                        let Ok(i) = usize::try_from(er.entry_id - first) else { continue };
                        if i >= n || out[i].is_some() {
                            continue;
                        }
                        if er.code == Code::Ok as i32 && entry_checksum(md.id, er.entry_id, &er.payload) == er.checksum
                        {
                            out[i] = Some(er.payload);
                        } else {
                            let what = if er.code == Code::Ok as i32 {
                                "checksum mismatch".to_owned()
                            } else {
                                format!("code {} {}", er.code, er.message)
                            };
                            errors[i].push_str(&format!("{b}: {what}; "));
                        }
                    }
                }
                Err(e) => {
                    ctx.bookies.forget(&b);
                    for id in chunk {
                        if let Ok(i) = usize::try_from(id - first) {
                            errors[i].push_str(&format!("{e}; "));
                        }
                    }
                }
            }
        }
    }
    out.into_iter()
        .enumerate()
        .map(|(i, e)| {
            e.ok_or_else(|| LedgerError::Unreadable {
                ledger: md.id,
                entry: first + i as i64,
                reason: errors[i].clone(),
            })
        })
        .collect()
}
