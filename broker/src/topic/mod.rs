//! Topics. Every topic is loaded through [`Topics::get_or_load`], the one place a future
//! ownership (lease) check will guard. Today a loaded topic writes to one ledger created at
//! load time; the ledger list, rollover and recovery of earlier ledgers are not built yet.

use std::collections::HashMap;
use std::sync::Arc;

use magnetar_bookie::client::{LedgerClient, LedgerConfig, LedgerError, LedgerWriter};
use tokio::sync::Mutex;

use crate::protocol::names::TopicName;

/// A loaded topic.
pub struct Topic {
    /// Its name.
    pub name: TopicName,
    /// The ledger currently written.
    pub writer: LedgerWriter,
}

/// The topics this broker has loaded.
pub struct Topics {
    ledgers: LedgerClient,
    ensemble: (usize, usize, usize),
    loaded: Mutex<HashMap<TopicName, Arc<Topic>>>,
}

impl Topics {
    /// Topics whose ledgers use `ensemble` = (E, Qw, Qa).
    pub fn new(ledgers: LedgerClient, ensemble: (usize, usize, usize)) -> Self {
        Topics { ledgers, ensemble, loaded: Mutex::new(HashMap::new()) }
    }

    /// The loaded topic, loading it (and creating its ledger) if needed.
    pub async fn get_or_load(&self, name: &TopicName) -> Result<Arc<Topic>, LedgerError> {
        let mut loaded = self.loaded.lock().await;
        if let Some(t) = loaded.get(name) {
            return Ok(t.clone());
        }
        let (e, qw, qa) = self.ensemble;
        let mut cfg = LedgerConfig::new(e, qw, qa);
        cfg.custom.insert("topic".into(), name.to_string());
        let writer = self.ledgers.create(cfg).await?;
        tracing::info!(topic = %name, ledger = writer.id(), "topic loaded");
        let t = Arc::new(Topic { name: name.clone(), writer });
        loaded.insert(name.clone(), t.clone());
        Ok(t)
    }
}
