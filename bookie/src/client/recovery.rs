//! Ledger recovery: how a new writer takes over a ledger whose writer may still be alive,
//! following LEDGER_PROTOCOL.md "Recovery" step by step:
//!
//! 1. CAS the state OPEN → IN_RECOVERY (the old writer's next metadata CAS fails);
//! 2. fence + read LAC on every bookie of the last fragment;
//! 3. wait until every write set has `Qw - Qa + 1` answers (no write quorum can still hold
//!    `Qa` unfenced bookies);
//! 4. read from `max(LACs, first entry of the last fragment - 1) + 1`;
//! 5. read forward with recovery reads, which fence too: an entry any bookie returns intact is
//!    recovered; `Qw - Qa + 1` "no such entry" answers from its write set end the ledger;
//!    anything else is undecided and aborts (never "can't tell" taken as "not there");
//! 6. write recovered entries back to their whole write set (recovery adds);
//! 7. CAS IN_RECOVERY → CLOSED on the version written in step 1, with step 6's ensemble
//!    changes (kept in memory until then: a recovery that dies half-way leaves the metadata
//!    as it found it).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use magnetar_metastore::client::{ClientError, PutOptions};
use magnetar_proto::bookie::{Code, FenceRequest, ReadRequest};

use super::metadata::{ledger_key, write_set, write_set_positions, LedgerMetadata, LedgerState};
use super::writer::LedgerWriter;
use super::{Ctx, LedgerError};
use crate::checksum::entry_checksum;

/// Recovers and closes ledger `id`, retrying undecided attempts.
pub(crate) async fn recover(ctx: &Arc<Ctx>, id: u64) -> Result<LedgerMetadata, LedgerError> {
    let mut attempt = 0u32;
    loop {
        match try_recover(ctx, id).await {
            Err(LedgerError::RecoveryUndecided { reason, .. }) if attempt < ctx.opts.recovery_attempts => {
                attempt += 1;
                tracing::warn!(ledger = id, attempt, %reason, "ledger recovery undecided; retrying");
                // Random spread: recoveries that keep taking the ledger over from each other
                // (each step 1 ends the other's attempt) fall out of step.
                let base = 200 * u64::from(attempt);
                let wait = base / 2 + rand::random_range(0..=base);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            r => return r,
        }
    }
}

fn undecided(ledger: u64, reason: impl Into<String>) -> LedgerError {
    LedgerError::RecoveryUndecided { ledger, reason: reason.into() }
}

async fn try_recover(ctx: &Arc<Ctx>, id: u64) -> Result<LedgerMetadata, LedgerError> {
    let key = ledger_key(id);
    let kv = ctx.meta.get(&key).await?.ok_or(LedgerError::NoSuchLedger(id))?;
    let mut md: LedgerMetadata =
        serde_json::from_slice(&kv.value).map_err(|e| LedgerError::Invalid(format!("ledger {id} metadata: {e}")))?;
    if md.state == LedgerState::Closed {
        return Ok(md);
    }
    // Step 1 (also when another recoverer died half-way: bumping the version takes over).
    md.state = LedgerState::InRecovery;
    let body = serde_json::to_vec(&md).map_err(|e| LedgerError::Invalid(e.to_string()))?;
    let version = match ctx.meta.put(&key, body, PutOptions { expected_version: Some(kv.version), session: 0 }).await {
        Ok(v) => v,
        Err(ClientError::BadVersion { .. }) => return Err(undecided(id, "metadata changed while starting recovery")),
        Err(e) => return Err(e.into()),
    };
    let frag = md.last_fragment().clone();
    let (e_size, qw, qa) = (md.ensemble_size, md.write_quorum, md.ack_quorum);
    let master_key = Bytes::from(md.master_key());

    // Steps 2 and 3.
    let mut answered = vec![false; e_size];
    let mut max_lac = -1i64;
    let mut futs: FuturesUnordered<_> = frag
        .bookies
        .iter()
        .enumerate()
        .filter(|(_, b)| !ctx.faults.skips_fence(b))
        .map(|(pos, b)| {
            let (ctx, b, key) = (ctx.clone(), b.clone(), master_key.clone());
            async move {
                let r = async {
                    let mut c = ctx.bookies.client(&b).await.ok()?;
                    let req = FenceRequest { ledger_id: id, master_key: key };
                    let resp = tokio::time::timeout(ctx.opts.read_timeout, c.fence(req)).await.ok()?.ok()?.into_inner();
                    (resp.code == Code::Ok as i32).then_some(resp.lac)
                }
                .await;
                (pos, b, r)
            }
        })
        .collect();
    let covered = |answered: &[bool]| {
        (0..e_size).all(|s| write_set_positions(e_size, qw, s as i64).filter(|p| answered[*p]).count() > qw - qa)
    };
    while let Some((pos, b, r)) = futs.next().await {
        match r {
            Some(lac) => {
                answered[pos] = true;
                max_lac = max_lac.max(lac);
            }
            None => tracing::warn!(ledger = id, bookie = %b, "fence + read LAC got no answer"),
        }
        if covered(&answered) {
            break;
        }
    }
    if !covered(&answered) {
        return Err(undecided(id, "too few bookies of the last fragment answered the fence"));
    }
    drop(futs);

    // Steps 4 and 5.
    let start = max_lac.max(frag.first_entry - 1) + 1;
    let mut recovered: Vec<Bytes> = Vec::new();
    let mut entry = start;
    loop {
        let ws = write_set(&frag.bookies, qw, entry);
        match recovery_read(ctx, id, entry, &ws, &master_key, qw - qa + 1).await {
            ReadOutcome::Found(p) => recovered.push(p),
            ReadOutcome::Absent => break,
            ReadOutcome::Unknown(reason) => return Err(undecided(id, format!("entry {entry}: {reason}"))),
        }
        entry += 1;
    }
    tracing::info!(
        ledger = id,
        lac = max_lac,
        first_read = start,
        recovered = recovered.len(),
        "ledger recovery read done"
    );

    // Steps 6 and 7.
    if recovered.is_empty() {
        md.state = LedgerState::Closed;
        md.last_entry = start - 1;
        let body = serde_json::to_vec(&md).map_err(|e| LedgerError::Invalid(e.to_string()))?;
        return match ctx.meta.put(&key, body, PutOptions { expected_version: Some(version), session: 0 }).await {
            Ok(_) => Ok(md),
            Err(ClientError::BadVersion { .. }) => Err(undecided(id, "metadata changed during recovery")),
            Err(e) => Err(e.into()),
        };
    }
    let writer = LedgerWriter::spawn(ctx.clone(), md, version, true, start);
    let adds: Vec<_> = recovered.into_iter().map(|p| writer.append(p)).collect();
    let written = async {
        for a in adds {
            a.await?;
        }
        writer.close().await
    };
    match written.await {
        // Another recovery took the ledger over (its step 1) or closed it meanwhile: the next
        // attempt returns the ledger it closed, or takes over again.
        Err(LedgerError::Fenced(_) | LedgerError::MetadataConflict { .. }) => {
            Err(undecided(id, "another recovery took the ledger over"))
        }
        r => r,
    }
}

enum ReadOutcome {
    Found(Bytes),
    Absent,
    Unknown(String),
}

async fn recovery_read(
    ctx: &Arc<Ctx>,
    id: u64,
    entry: i64,
    ws: &[String],
    key: &Bytes,
    absent_needed: usize,
) -> ReadOutcome {
    let mut futs: FuturesUnordered<_> = ws
        .iter()
        .filter(|b| !ctx.faults.drops_reads(b))
        .map(|b| {
            let (ctx, b, key) = (ctx.clone(), b.clone(), key.clone());
            async move {
                let r = async {
                    let mut c = ctx.bookies.client(&b).await.map_err(|e| e.to_string())?;
                    let req = ReadRequest { ledger_id: id, entry_ids: vec![entry], fence: true, master_key: key };
                    match tokio::time::timeout(ctx.opts.read_timeout, c.read(req)).await {
                        Ok(Ok(r)) => {
                            let mut er =
                                r.into_inner().entries.into_iter().next().ok_or_else(|| "empty answer".to_owned())?;
                            if ctx.faults.corrupts_reads(&b) && !er.payload.is_empty() {
                                let mut p = er.payload.to_vec();
                                p[0] ^= 0xff;
                                er.payload = p.into();
                            }
                            Ok(er)
                        }
                        Ok(Err(s)) => Err(s.message().to_owned()),
                        Err(_) => Err("timed out".to_owned()),
                    }
                }
                .await;
                (b, r)
            }
        })
        .collect();
    let mut absent = 0;
    let mut other = Vec::new();
    while let Some((b, r)) = futs.next().await {
        match r {
            Ok(er) if er.code == Code::Ok as i32 && entry_checksum(id, entry, &er.payload) == er.checksum => {
                return ReadOutcome::Found(er.payload)
            }
            Ok(er) if er.code == Code::NoEntry as i32 => {
                absent += 1;
                if absent >= absent_needed {
                    return ReadOutcome::Absent;
                }
            }
            Ok(er) if er.code == Code::Ok as i32 => other.push(format!("{b}: checksum mismatch")),
            Ok(er) => other.push(format!("{b}: code {} {}", er.code, er.message)),
            Err(e) => other.push(format!("{b}: {e}")),
        }
    }
    ReadOutcome::Unknown(format!("{absent} of {absent_needed} needed no-entry answers; others: {}", other.join(", ")))
}
