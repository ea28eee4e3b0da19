//! Topic ownership across brokers.
//!
//! A namespace is cut into bundles (`numBundles` equal ranges of a 32-bit hash of the topic
//! name, 4 by default as in Pulsar). A broker serves a topic only while it owns the topic's
//! bundle: an ephemeral key `/ownership/<tenant>/<namespace>/<bundle>` bound to the broker's
//! metastore session and naming the broker's URLs. Live brokers register at `/brokers/<id>`,
//! bound to the same session.
//!
//! - A free bundle is assigned by rendezvous hashing over the live brokers, so bundles spread
//!   evenly without a central assigner. A lookup that lands on another broker is redirected
//!   there (authoritatively); the broker that is asked authoritatively takes the bundle.
//! - A broker that restarts under the same id takes its old records over at once instead of
//!   waiting for its previous session to expire.
//! - When the session is lost every ephemeral key of it goes, so another broker may take the
//!   bundles: the broker unloads all its topics and opens a new session. Ownership is a lease,
//!   not a lock — a new owner fences the previous writer's ledgers when it loads a topic, so
//!   an old owner that did not notice in time fails instead of writing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_metastore::client::{ClientError, Kv, MetaClient, PutOptions, Session};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::protocol::names::TopicName;
use crate::topic::keys::murmur3_32;

/// Bundles of a namespace whose policies do not say (Pulsar's `defaultNumberOfNamespaceBundles`).
pub const DEFAULT_BUNDLES: u32 = 4;

/// A broker as other brokers and clients reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerInfo {
    /// Stable id (the advertised address unless configured).
    pub broker_id: String,
    /// `pulsar://host:port`.
    pub broker_url: String,
    /// `http://host:port` of the admin API, or empty.
    pub http_url: String,
}

/// Where a topic is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// By this broker (it holds the bundle now).
    Me,
    /// By another broker that holds the bundle.
    Other(BrokerInfo),
    /// Nobody holds the bundle; this broker is its assigned candidate: ask it
    /// authoritatively.
    Candidate(BrokerInfo),
}

/// Why ownership could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// A metastore call failed.
    #[error("metastore: {0}")]
    Meta(#[from] ClientError),
    /// The broker has no live session right now (it is opening a new one).
    #[error("the broker is re-registering with the metastore; retry shortly")]
    NoSession,
    /// A live broker at another address is registered under this broker's id.
    #[error(
        "broker id `{}` is registered by a live broker at {}: give every broker its own broker_id",
        .0.broker_id,
        .0.broker_url
    )]
    Taken(BrokerInfo),
}

/// Beyond twice its session timeout, how long a starting broker waits for another session's
/// registration under its id to go.
const TAKEN_GRACE: Duration = Duration::from_secs(5);

/// How often a broker whose id is registered by another session looks again.
const REGISTER_POLL: Duration = Duration::from_millis(250);

/// The bundle range `[lo, hi)` of `hash` among `n` equal bundles, named as Pulsar names them.
pub fn bundle_name(hash: u32, n: u32) -> String {
    let n = u64::from(n.max(1));
    let size = (1u64 << 32) / n;
    let i = (u64::from(hash) / size).min(n - 1);
    let lo = i * size;
    let hi = if i == n - 1 { 1u64 << 32 } else { lo + size };
    // Pulsar prints the upper bound of the last bundle as 0xffffffff.
    format!("0x{:08x}_0x{:08x}", lo, hi.min(0xffff_ffff))
}

/// This broker's hold on bundles.
pub struct Ownership {
    meta: MetaClient,
    me: BrokerInfo,
    ttl: Duration,
    /// The only broker of its metastore (a standalone): see [`open`].
    sole: bool,
    /// The live session id (0 while re-registering).
    session: watch::Sender<u64>,
    /// Bundle keys held under the current session.
    held: Mutex<HashSet<String>>,
    /// Bumped each time a session is lost (everything held is gone).
    losses: watch::Sender<u64>,
    cancel: CancellationToken,
}

impl Ownership {
    /// Opens a session, registers the broker and keeps both alive until `cancel`; a lost
    /// session is reported on [`Ownership::losses`] and replaced.
    pub async fn start(
        meta: MetaClient,
        me: BrokerInfo,
        ttl: Duration,
        sole: bool,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, OwnershipError> {
        // A record of another address under this id is either a broker restarted elsewhere
        // (its old session expires within its timeout, longer if the metastore's leader
        // changes meanwhile) or another live broker given the same id: wait out twice the
        // session timeout and 5 s more, then refuse to start.
        let deadline = tokio::time::Instant::now() + 2 * ttl + TAKEN_GRACE;
        let mut warned = false;
        let first = loop {
            match open(&meta, &me, ttl, sole).await {
                Ok(s) => break s,
                // Taken, or registered by someone else between the look and the write.
                Err(e @ (OwnershipError::Taken(_) | OwnershipError::Meta(ClientError::BadVersion { .. })))
                    if tokio::time::Instant::now() < deadline =>
                {
                    if let (OwnershipError::Taken(other), false) = (&e, warned) {
                        tracing::warn!(broker = %me.broker_id, other = %other.broker_url,
                            "another broker is registered under this id; waiting for its session to end");
                        warned = true;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(OwnershipError::NoSession),
                        _ = tokio::time::sleep(REGISTER_POLL) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let own = Arc::new(Ownership {
            meta,
            me,
            ttl,
            sole,
            session: watch::Sender::new(first.id()),
            held: Mutex::new(HashSet::new()),
            losses: watch::Sender::new(0),
            cancel,
        });
        tokio::spawn(supervise(own.clone(), first));
        Ok(own)
    }

    /// This broker.
    pub fn me(&self) -> &BrokerInfo {
        &self.me
    }

    /// Registered under a live session now (false while it opens a new one).
    pub fn registered(&self) -> bool {
        *self.session.borrow() != 0
    }

    /// Counts lost sessions; a change means every topic must be unloaded.
    pub fn losses(&self) -> watch::Receiver<u64> {
        self.losses.subscribe()
    }

    /// Sessions lost so far (compare before and after work that relies on ownership).
    pub fn epoch(&self) -> u64 {
        *self.losses.borrow()
    }

    /// The live brokers, by id.
    pub async fn brokers(&self) -> Result<Vec<BrokerInfo>, ClientError> {
        let mut out: Vec<BrokerInfo> =
            self.meta.list("/brokers/").await?.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect();
        out.sort_by(|a, b| a.broker_id.cmp(&b.broker_id));
        Ok(out)
    }

    /// The ownership key of `topic`'s bundle.
    pub async fn bundle_key(&self, topic: &TopicName) -> Result<String, ClientError> {
        let ns = format!("{}/{}", topic.tenant, topic.namespace);
        let n = match self.meta.get(&format!("/namespaces/{ns}")).await? {
            Some(kv) => serde_json::from_slice::<serde_json::Value>(&kv.value)
                .ok()
                .and_then(|v| v["bundles"]["numBundles"].as_u64())
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .unwrap_or(DEFAULT_BUNDLES),
            None => DEFAULT_BUNDLES,
        };
        let hash = murmur3_32(topic.to_string().as_bytes(), 0);
        Ok(format!("/ownership/{ns}/{}", bundle_name(hash, n)))
    }

    /// Where `topic` is served. `authoritative`: the caller was sent here to take the bundle,
    /// so a free bundle is taken rather than assigned.
    pub async fn resolve(&self, topic: &TopicName, authoritative: bool) -> Result<Owner, OwnershipError> {
        let key = self.bundle_key(topic).await?;
        for _ in 0..3 {
            let session = *self.session.borrow();
            if session == 0 {
                return Err(OwnershipError::NoSession);
            }
            if self.held_now(&key) {
                return Ok(Owner::Me);
            }
            let expected = match self.meta.get(&key).await? {
                Some(kv) => match self.judge(&kv, session) {
                    Judged::Mine => {
                        self.hold(&key, session);
                        return Ok(Owner::Me);
                    }
                    Judged::Other(b) => return Ok(Owner::Other(b)),
                    Judged::TakeOver => kv.version,
                },
                None => {
                    if !authoritative {
                        let candidate = self.candidate(&key).await?;
                        if candidate.broker_id != self.me.broker_id {
                            return Ok(Owner::Candidate(candidate));
                        }
                    }
                    0
                }
            };
            let body = serde_json::to_vec(&self.me).unwrap_or_default();
            match self.meta.put(&key, body, PutOptions { expected_version: Some(expected), session }).await {
                Ok(_) => {
                    self.hold(&key, session);
                    tracing::info!(bundle = %key, "took bundle ownership");
                    return Ok(Owner::Me);
                }
                // Someone else took it meanwhile (or our session ended): look again.
                Err(ClientError::BadVersion { .. } | ClientError::NoSuchSession(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(OwnershipError::NoSession)
    }

    /// Gives every bundle up at once (clean shutdown): the session is closed, so its
    /// ephemeral keys — registration and ownerships — are deleted.
    pub async fn release(&self) {
        self.cancel.cancel();
        let id = self.session.send_replace(0);
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if id != 0 {
            if let Err(e) = self.meta.close_session(id).await {
                tracing::warn!(error = %e, "closing the broker's metastore session");
            }
        }
    }

    fn held_now(&self, key: &str) -> bool {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).contains(key)
    }

    fn hold(&self, key: &str, session: u64) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        // A session lost meanwhile cleared the set; do not add to the new one.
        if *self.session.borrow() == session {
            held.insert(key.to_owned());
        }
    }

    fn judge(&self, kv: &Kv, session: u64) -> Judged {
        if kv.session == session {
            return Judged::Mine;
        }
        match serde_json::from_slice::<BrokerInfo>(&kv.value) {
            // An earlier run of this broker: take it over instead of waiting for its session.
            Ok(b) if b.broker_id == self.me.broker_id => Judged::TakeOver,
            Ok(b) => Judged::Other(b),
            // Unreadable: treat as stale and take it (the lease is only a hint for routing;
            // fencing keeps the data safe).
            Err(_) => Judged::TakeOver,
        }
    }

    /// The live broker a free bundle goes to: the highest hash of (broker id, bundle).
    async fn candidate(&self, key: &str) -> Result<BrokerInfo, ClientError> {
        let brokers = self.brokers().await?;
        let best = brokers.into_iter().max_by_key(|b| {
            let mut s = b.broker_id.clone().into_bytes();
            s.push(0);
            s.extend_from_slice(key.as_bytes());
            (murmur3_32(&s, 0x5bd1_e995), b.broker_id.clone())
        });
        Ok(best.unwrap_or_else(|| self.me.clone()))
    }
}

enum Judged {
    Mine,
    Other(BrokerInfo),
    TakeOver,
}

/// Opens a session and registers the broker under it. A record under the same id left by
/// this broker's address (an earlier run), or by any address when the broker is `sole`, is
/// taken over; one naming another address is `Taken` while its session lives.
async fn open(meta: &MetaClient, me: &BrokerInfo, ttl: Duration, sole: bool) -> Result<Session, OwnershipError> {
    let key = format!("/brokers/{}", me.broker_id);
    let expected = match meta.get(&key).await? {
        None => 0,
        Some(kv) => match serde_json::from_slice::<BrokerInfo>(&kv.value) {
            Ok(other) if !sole && kv.session != 0 && other.broker_url != me.broker_url => {
                return Err(OwnershipError::Taken(other));
            }
            _ => kv.version,
        },
    };
    let session = meta.session(ttl).await?;
    let body = serde_json::to_vec(me).unwrap_or_default();
    // Conditional on what was read: a broker registering meanwhile makes this fail and the
    // caller look again.
    if let Err(e) = meta.put(&key, body, PutOptions { expected_version: Some(expected), session: session.id() }).await {
        if let Err(close) = meta.close_session(session.id()).await {
            tracing::debug!(error = %close, "closing an unused metastore session");
        }
        return Err(e.into());
    }
    tracing::info!(broker = %me.broker_id, session = session.id(), "registered with the metastore");
    Ok(session)
}

/// Waits for the session to be lost, reports it, and opens a new one (retrying until it
/// succeeds or the broker stops).
async fn supervise(own: Arc<Ownership>, mut session: Session) {
    loop {
        tokio::select! {
            _ = own.cancel.cancelled() => return,
            _ = session.lost() => {}
        }
        tracing::warn!(session = session.id(), "metastore session lost: giving up every bundle");
        own.session.send_replace(0);
        own.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        own.losses.send_modify(|n| *n += 1);
        let mut backoff = Duration::from_millis(100);
        session = loop {
            match open(&own.meta, &own.me, own.ttl, own.sole).await {
                Ok(s) => break s,
                Err(e) => {
                    if let OwnershipError::Taken(_) = e {
                        // Another broker registered under this id while this one had no
                        // session: this one serves nothing (its health check fails) until
                        // that one goes.
                        tracing::error!(error = %e, "re-registering with the metastore");
                    } else {
                        tracing::warn!(error = %e, "re-registering with the metastore");
                    }
                    tokio::select! {
                        _ = own.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        own.session.send_replace(session.id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_cover_the_hash_range_in_equal_parts() {
        assert_eq!(bundle_name(0, 4), "0x00000000_0x40000000");
        assert_eq!(bundle_name(0x3fff_ffff, 4), "0x00000000_0x40000000");
        assert_eq!(bundle_name(0x4000_0000, 4), "0x40000000_0x80000000");
        assert_eq!(bundle_name(u32::MAX, 4), "0xc0000000_0xffffffff");
        assert_eq!(bundle_name(12345, 1), "0x00000000_0xffffffff");
        assert_eq!(bundle_name(u32::MAX, 3), "0xaaaaaaaa_0xffffffff");
        assert_eq!(bundle_name(0, 0), "0x00000000_0xffffffff");
    }
}
