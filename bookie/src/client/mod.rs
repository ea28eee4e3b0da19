//! The ledger client: create, write, recover, read and delete replicated ledgers.
//!
//! ```text
//! let client = LedgerClient::new(meta, LedgerOptions::default());
//! let w = client.create(LedgerConfig::new(3, 2, 2)).await?;
//! let id = w.append(b"hello".to_vec()).await?;      // confirmed by Qa bookies
//! let md = w.close().await?;                         // CLOSED at the last confirmed entry
//! let md = client.recover(ledger_id).await?;         // a new writer taking over
//! let entries = client.open_reader(id).await?.read(0, md.last_entry).await?;
//! ```

pub mod bookies;
mod error;
pub mod faults;
pub mod metadata;
pub mod reader;
mod recovery;
pub mod writer;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use magnetar_metastore::client::{MetaClient, Txn};
use magnetar_proto::bookie::DeleteLedgerRequest;
use rand::seq::SliceRandom;

pub use bookies::Bookies;
pub use error::LedgerError;
pub use faults::Faults;
pub use metadata::{Fragment, LedgerMetadata, LedgerState};
pub use reader::LedgerReader;
pub use writer::LedgerWriter;

/// Client tuning.
#[derive(Clone, Debug)]
pub struct LedgerOptions {
    /// An add not acknowledged by a bookie within this time replaces that bookie.
    pub add_timeout: Duration,
    /// Timeout of one read, LAC or fence request.
    pub read_timeout: Duration,
    /// TCP connect timeout to a bookie.
    pub connect_timeout: Duration,
    /// How long an ensemble change may wait for a replacement bookie.
    pub ensemble_change_timeout: Duration,
    /// Undecided recovery attempts retried before giving up.
    pub recovery_attempts: u32,
    /// Recorded in ledger metadata.
    pub created_by: String,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            add_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            ensemble_change_timeout: Duration::from_secs(10),
            recovery_attempts: 5,
            created_by: String::new(),
        }
    }
}

/// Replication settings of a new ledger.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// E.
    pub ensemble_size: usize,
    /// Qw.
    pub write_quorum: usize,
    /// Qa.
    pub ack_quorum: usize,
    /// Application properties.
    pub custom: BTreeMap<String, String>,
}

impl LedgerConfig {
    /// E, Qw, Qa.
    pub fn new(ensemble_size: usize, write_quorum: usize, ack_quorum: usize) -> Self {
        LedgerConfig { ensemble_size, write_quorum, ack_quorum, custom: BTreeMap::new() }
    }
}

pub(crate) struct Ctx {
    pub(crate) meta: MetaClient,
    pub(crate) bookies: Bookies,
    pub(crate) faults: Arc<Faults>,
    pub(crate) opts: LedgerOptions,
}

/// Entry point to ledgers.
#[derive(Clone)]
pub struct LedgerClient {
    ctx: Arc<Ctx>,
}

impl LedgerClient {
    /// A client over `meta`.
    pub fn new(meta: MetaClient, opts: LedgerOptions) -> Self {
        Self::build(meta, opts, None)
    }

    /// A client over `meta` that sends adds for `local` (a bookie in this process) straight
    /// to its journal; every other bookie, and reads, go over gRPC as usual.
    pub fn with_local_bookie(meta: MetaClient, opts: LedgerOptions, local: crate::server::LocalBookie) -> Self {
        Self::build(meta, opts, Some(local))
    }

    fn build(meta: MetaClient, opts: LedgerOptions, local: Option<crate::server::LocalBookie>) -> Self {
        let bookies = Bookies::new(meta.clone(), opts.connect_timeout, local);
        LedgerClient { ctx: Arc::new(Ctx { meta, bookies, faults: Arc::new(Faults::default()), opts }) }
    }

    /// Fault injection rules (tests).
    pub fn faults(&self) -> &Arc<Faults> {
        &self.ctx.faults
    }

    /// The bookie registry and connections.
    pub fn bookies(&self) -> &Bookies {
        &self.ctx.bookies
    }

    /// Creates a ledger on `E` random writable bookies and opens its writer.
    pub async fn create(&self, cfg: LedgerConfig) -> Result<LedgerWriter, LedgerError> {
        match self.create_with(cfg, |_| Ok(Txn::default())).await? {
            Some((writer, _)) => Ok(writer),
            None => Err(LedgerError::Meta("the new ledger's id was taken already".into())),
        }
    }

    /// Creates a ledger like [`Self::create`], its metadata written in one transaction with
    /// the compares and ops `with(id)` returns: an application lists the new ledger in the same
    /// write, so no crash leaves a ledger that nothing lists. Returns the writer and the
    /// transaction's revision (the version of every key it put), or `None` when one of the
    /// compares failed and nothing was written.
    pub async fn create_with(
        &self,
        cfg: LedgerConfig,
        with: impl FnOnce(u64) -> Result<Txn, LedgerError>,
    ) -> Result<Option<(LedgerWriter, u64)>, LedgerError> {
        let md = self.new_metadata(cfg).await?;
        let body = serde_json::to_vec(&md).map_err(|e| LedgerError::Invalid(e.to_string()))?;
        let key = metadata::ledger_key(md.id);
        let txn = with(md.id)?.compare(key.clone(), 0).put(key, body, 0);
        let r = self.ctx.meta.txn(txn).await?;
        if !r.succeeded {
            return Ok(None);
        }
        tracing::debug!(ledger = md.id, ensemble = ?md.fragments[0].bookies, "ledger created");
        Ok(Some((LedgerWriter::spawn(self.ctx.clone(), md, r.revision, false, 0), r.revision)))
    }

    /// The metadata of a new ledger: a fresh id, `E` random writable bookies.
    async fn new_metadata(&self, cfg: LedgerConfig) -> Result<LedgerMetadata, LedgerError> {
        let (e, qw, qa) = (cfg.ensemble_size, cfg.write_quorum, cfg.ack_quorum);
        if !(e >= qw && qw >= qa && qa >= 1) {
            return Err(LedgerError::Invalid(format!("need E >= Qw >= Qa >= 1, got E={e} Qw={qw} Qa={qa}")));
        }
        if e > metadata::MAX_ENSEMBLE {
            return Err(LedgerError::Invalid(format!(
                "E={e}: an ensemble has at most {} bookies",
                metadata::MAX_ENSEMBLE
            )));
        }
        let mut writable = self.ctx.bookies.writable().await?;
        if writable.len() < e {
            return Err(LedgerError::NotEnoughBookies { needed: e, available: writable.len() });
        }
        writable.shuffle(&mut rand::rng());
        writable.truncate(e);
        let id = self.ctx.meta.next_id("ledgers").await?;
        Ok(LedgerMetadata {
            id,
            ensemble_size: e,
            write_quorum: qw,
            ack_quorum: qa,
            state: LedgerState::Open,
            last_entry: -1,
            fragments: vec![Fragment { first_entry: 0, bookies: writable }],
            password: metadata::encode_hex(&rand::random::<[u8; 16]>()),
            created_by: self.ctx.opts.created_by.clone(),
            ctime_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            custom: cfg.custom,
        })
    }

    /// A ledger's metadata and its version.
    pub async fn metadata(&self, id: u64) -> Result<(LedgerMetadata, u64), LedgerError> {
        let kv = self.ctx.meta.get(&metadata::ledger_key(id)).await?.ok_or(LedgerError::NoSuchLedger(id))?;
        let md = serde_json::from_slice(&kv.value)
            .map_err(|e| LedgerError::Invalid(format!("ledger {id} metadata: {e}")))?;
        Ok((md, kv.version))
    }

    /// Takes a ledger over: fences its writer, recovers its tail and closes it. Idempotent on a
    /// closed ledger.
    pub async fn recover(&self, id: u64) -> Result<LedgerMetadata, LedgerError> {
        recovery::recover(&self.ctx, id).await
    }

    /// A reader of a ledger without recovering it: for an open ledger it may read up to the
    /// LAC its bookies report ([`LedgerReader::refresh_lac`]).
    pub async fn open_reader(&self, id: u64) -> Result<LedgerReader, LedgerError> {
        let (md, _) = self.metadata(id).await?;
        let frag_start = md.last_fragment().first_entry;
        let mut r = LedgerReader::new(self.ctx.clone(), md, frag_start - 1);
        r.refresh_lac().await?;
        Ok(r)
    }

    /// Deletes a ledger's metadata, then asks its bookies to drop its entries (bookies that
    /// are down do it later through their garbage collector).
    pub async fn delete(&self, id: u64) -> Result<(), LedgerError> {
        let (md, version) = self.metadata(id).await?;
        self.ctx.meta.delete(&metadata::ledger_key(id), Some(version)).await?;
        self.drop_entries(&md).await;
        Ok(())
    }

    /// Deletes a ledger whose metadata is still at `version`, in one transaction with the
    /// compares of `txn` (an application checks that the ledger is still unlisted), then asks
    /// its bookies to drop its entries. `false`: a compare failed and nothing was deleted.
    pub async fn delete_if(&self, md: &LedgerMetadata, version: u64, txn: Txn) -> Result<bool, LedgerError> {
        let key = metadata::ledger_key(md.id);
        if !self.ctx.meta.txn(txn.compare(key.clone(), version).delete(key)).await?.succeeded {
            return Ok(false);
        }
        self.drop_entries(md).await;
        Ok(true)
    }

    /// Every ledger's metadata and version (ledgers whose metadata does not parse are left
    /// out, with a warning); `stale`: read from any metastore node, possibly behind.
    pub async fn list(&self, stale: bool) -> Result<Vec<(LedgerMetadata, u64)>, LedgerError> {
        let mut out = Vec::new();
        for kv in self.ctx.meta.list_with(metadata::LEDGERS_PREFIX, stale).await? {
            match serde_json::from_slice::<LedgerMetadata>(&kv.value) {
                Ok(md) => out.push((md, kv.version)),
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable ledger metadata"),
            }
        }
        Ok(out)
    }

    /// Asks the bookies of a deleted ledger to drop its entries now; one that does not (down,
    /// slow) drops them through its garbage collector.
    async fn drop_entries(&self, md: &LedgerMetadata) {
        let id = md.id;
        let mut bookies: Vec<String> = md.fragments.iter().flat_map(|f| f.bookies.iter().cloned()).collect();
        bookies.sort();
        bookies.dedup();
        for b in bookies {
            let ok = async {
                let mut c = self.ctx.bookies.client(&b).await.ok()?;
                tokio::time::timeout(self.ctx.opts.read_timeout, c.delete_ledger(DeleteLedgerRequest { ledger_id: id }))
                    .await
                    .ok()?
                    .ok()
            }
            .await;
            if ok.is_none() {
                tracing::debug!(ledger = id, bookie = %b, "bookie did not delete the ledger now; its GC will");
            }
        }
    }
}
