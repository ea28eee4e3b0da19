//! Topics. Every topic is loaded through [`Topics::get_or_load`], the one place a future
//! ownership (lease) check will guard.
//!
//! A topic's ledgers are listed at `/topics/<domain>/<tenant>/<namespace>/<topic>` and the list
//! changes only by compare-and-swap. Loading a topic first recovers the last listed ledger —
//! which fences any earlier writer, such as a broker that lost the topic but is still running
//! — and then appends a new ledger to the list and writes to it. So a restarted broker never
//! writes behind an older writer, and every acknowledged entry stays in a closed ledger of the
//! list. Rollover, the tail cache and consumers are not built yet.

use std::collections::HashMap;
use std::sync::Arc;

use magnetar_bookie::client::{LedgerClient, LedgerConfig, LedgerError, LedgerWriter};
use magnetar_metastore::client::{ClientError, MetaClient, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::protocol::names::TopicName;

/// The metastore key of a topic's managed-ledger metadata.
pub fn topic_key(name: &TopicName) -> String {
    format!("/topics/{}/{}/{}/{}", name.domain, name.tenant, name.namespace, name.local)
}

/// One ledger of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerInfo {
    /// Ledger id.
    pub ledger_id: u64,
    /// Last entry once known closed (-1: empty; absent while written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_entry: Option<i64>,
}

/// A topic's managed-ledger metadata.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedLedgerInfo {
    /// Ledgers, oldest first.
    pub ledgers: Vec<LedgerInfo>,
}

/// A loaded topic.
pub struct Topic {
    /// Its name.
    pub name: TopicName,
    /// The ledger currently written.
    pub writer: LedgerWriter,
}

/// Why a topic could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// A ledger operation failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A metastore call failed.
    #[error("metastore: {0}")]
    Meta(#[from] ClientError),
    /// Someone else changed the topic's metadata while it was being loaded.
    #[error("topic {0} was changed concurrently while loading")]
    Conflict(String),
    /// The stored metadata does not parse.
    #[error("topic {topic} metadata is unreadable: {reason}")]
    BadMetadata {
        /// Topic.
        topic: String,
        /// Why.
        reason: String,
    },
}

/// The topics this broker has loaded.
pub struct Topics {
    meta: MetaClient,
    ledgers: LedgerClient,
    ensemble: (usize, usize, usize),
    loaded: Mutex<HashMap<TopicName, Arc<Topic>>>,
}

impl Topics {
    /// Topics whose ledgers use `ensemble` = (E, Qw, Qa).
    pub fn new(meta: MetaClient, ledgers: LedgerClient, ensemble: (usize, usize, usize)) -> Self {
        Topics { meta, ledgers, ensemble, loaded: Mutex::new(HashMap::new()) }
    }

    /// The loaded topic, loading it if needed.
    pub async fn get_or_load(&self, name: &TopicName) -> Result<Arc<Topic>, TopicError> {
        let mut loaded = self.loaded.lock().await;
        if let Some(t) = loaded.get(name) {
            return Ok(t.clone());
        }
        let t = Arc::new(self.load(name).await?);
        loaded.insert(name.clone(), t.clone());
        Ok(t)
    }

    async fn load(&self, name: &TopicName) -> Result<Topic, TopicError> {
        let key = topic_key(name);
        let (mut info, version) = match self.meta.get(&key).await? {
            Some(kv) => {
                let info: ManagedLedgerInfo = serde_json::from_slice(&kv.value)
                    .map_err(|e| TopicError::BadMetadata { topic: name.to_string(), reason: e.to_string() })?;
                (info, kv.version)
            }
            None => (ManagedLedgerInfo::default(), 0),
        };
        // Fence and close whatever the previous owner was writing.
        if let Some(last) = info.ledgers.last_mut() {
            if last.last_entry.is_none() {
                let md = self.ledgers.recover(last.ledger_id).await?;
                last.last_entry = Some(md.last_entry);
                tracing::info!(topic = %name, ledger = md.id, last_entry = md.last_entry, "recovered the previous ledger");
            }
        }
        let (e, qw, qa) = self.ensemble;
        let mut cfg = LedgerConfig::new(e, qw, qa);
        cfg.custom.insert("topic".into(), name.to_string());
        let writer = self.ledgers.create(cfg).await?;
        info.ledgers.push(LedgerInfo { ledger_id: writer.id(), last_entry: None });
        let body = serde_json::to_vec(&info)
            .map_err(|e| TopicError::BadMetadata { topic: name.to_string(), reason: e.to_string() })?;
        match self.meta.put(&key, body, PutOptions { expected_version: Some(version), session: 0 }).await {
            Ok(_) => {}
            Err(ClientError::BadVersion { .. }) => {
                // Not ours: leave the new (empty) ledger to the garbage collector.
                let _ = self.ledgers.delete(writer.id()).await;
                return Err(TopicError::Conflict(name.to_string()));
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(topic = %name, ledger = writer.id(), ledgers = info.ledgers.len(), "topic loaded");
        Ok(Topic { name: name.clone(), writer })
    }
}
