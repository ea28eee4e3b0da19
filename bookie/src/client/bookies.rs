//! Connections to bookies and the registry of available ones.
//!
//! Bookies are named by id in ledger metadata; the address comes from the bookie's
//! registration (`/bookies/available/<id>`) or, while it is down, from its cookie
//! (`/bookies/cookies/<id>`). One lazily connected HTTP/2 channel per address is shared by
//! every ledger.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use magnetar_metastore::client::MetaClient;
use magnetar_proto::bookie::bookie_client::BookieClient;
use tonic::transport::{Channel, Endpoint};

use super::LedgerError;
use crate::server::cookie::{meta_key, Cookie};
use crate::server::{BookieInfo, LocalBookie, AVAILABLE_PREFIX};

/// A registered bookie.
#[derive(Clone, Debug)]
pub struct AvailableBookie {
    /// Id.
    pub id: String,
    /// What it registered.
    pub info: BookieInfo,
}

/// Channels to bookies.
pub struct Bookies {
    meta: MetaClient,
    addrs: Mutex<HashMap<String, String>>,
    channels: Mutex<HashMap<String, Channel>>,
    connect_timeout: Duration,
    local: Option<LocalBookie>,
}

impl Bookies {
    /// A pool resolving ids through `meta`; adds for `local`'s id go to that in-process
    /// bookie directly.
    pub fn new(meta: MetaClient, connect_timeout: Duration, local: Option<LocalBookie>) -> Self {
        Bookies {
            meta,
            addrs: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            connect_timeout,
            local,
        }
    }

    /// The in-process bookie, if `id` names it.
    pub(crate) fn local(&self, id: &str) -> Option<&LocalBookie> {
        self.local.as_ref().filter(|l| l.id() == id)
    }

    /// Registered bookies (writable and read-only).
    pub async fn available(&self) -> Result<Vec<AvailableBookie>, LedgerError> {
        let kvs = self.meta.list(AVAILABLE_PREFIX).await?;
        let mut out = Vec::new();
        for kv in kvs {
            let Some(id) = kv.key.strip_prefix(AVAILABLE_PREFIX) else { continue };
            if let Ok(info) = serde_json::from_slice::<BookieInfo>(&kv.value) {
                self.addrs.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned(), info.address.clone());
                out.push(AvailableBookie { id: id.to_owned(), info });
            }
        }
        Ok(out)
    }

    /// The writable registered bookies.
    pub async fn writable(&self) -> Result<Vec<String>, LedgerError> {
        Ok(self.available().await?.into_iter().filter(|b| !b.info.read_only).map(|b| b.id).collect())
    }

    async fn address(&self, id: &str) -> Result<String, LedgerError> {
        if let Some(a) = self.addrs.lock().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Ok(a.clone());
        }
        let addr = match self.meta.get(&format!("{AVAILABLE_PREFIX}{id}")).await? {
            Some(kv) => serde_json::from_slice::<BookieInfo>(&kv.value).ok().map(|i| i.address),
            None => None,
        };
        let addr = match addr {
            Some(a) => a,
            None => match self.meta.get(&meta_key(id)).await? {
                Some(kv) => {
                    serde_json::from_slice::<Cookie>(&kv.value).ok().map(|c| c.address).filter(|a| !a.is_empty())
                }
                None => None,
            }
            // Ids default to the address.
            .unwrap_or_else(|| id.to_owned()),
        };
        self.addrs.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned(), addr.clone());
        Ok(addr)
    }

    /// A client for bookie `id`.
    pub async fn client(&self, id: &str) -> Result<BookieClient<Channel>, LedgerError> {
        let addr = self.address(id).await?;
        let ch = {
            let mut g = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            match g.get(&addr) {
                Some(c) => c.clone(),
                None => {
                    let ep = Endpoint::from_shared(format!("http://{addr}"))
                        .map_err(|e| LedgerError::Bookie {
                            bookie: id.to_owned(),
                            reason: format!("bad address {addr}: {e}"),
                        })?
                        .connect_timeout(self.connect_timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(5))
                        .initial_stream_window_size(Some(8 << 20))
                        .initial_connection_window_size(Some(16 << 20))
                        .max_frame_size(Some(crate::H2_MAX_FRAME));
                    let c = ep.connect_lazy();
                    g.insert(addr.clone(), c.clone());
                    c
                }
            }
        };
        Ok(BookieClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
    }

    /// Forgets a bookie's address and channel (after failures, so a restarted bookie on a new
    /// address is found again).
    pub fn forget(&self, id: &str) {
        if let Some(addr) = self.addrs.lock().unwrap_or_else(|e| e.into_inner()).remove(id) {
            self.channels.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
        }
    }
}
