//! Cookies: a bookie's identity, written in every journal and ledger directory and in the
//! metastore (`/bookies/cookies/<id>`). A bookie whose directories do not match refuses to
//! start: a wiped disk would otherwise come back empty and answer "no such entry" for entries
//! it acknowledged, and a directory swapped in from another bookie would serve the wrong data.

use std::path::{Path, PathBuf};

use magnetar_metastore::client::{MetaClient, PutOptions};
use serde::{Deserialize, Serialize};

use crate::error::{BookieError, Result};

/// File name of the cookie in each directory.
pub const COOKIE_FILE: &str = "COOKIE";

/// A bookie's identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cookie {
    /// Bookie id.
    pub bookie_id: String,
    /// Random id chosen when the bookie was first formatted.
    pub instance_id: String,
    /// Journal directories, in order.
    pub journal_dirs: Vec<PathBuf>,
    /// Ledger directories, in order.
    pub ledger_dirs: Vec<PathBuf>,
    /// Last advertised gRPC address (readers use it while the bookie is down).
    #[serde(default)]
    pub address: String,
}

impl Cookie {
    fn same_identity(&self, other: &Cookie) -> bool {
        self.bookie_id == other.bookie_id
            && self.instance_id == other.instance_id
            && self.journal_dirs == other.journal_dirs
            && self.ledger_dirs == other.ledger_dirs
    }
}

/// Metastore key of a bookie's cookie.
pub fn meta_key(bookie_id: &str) -> String {
    format!("/bookies/cookies/{bookie_id}")
}

fn read_local(dir: &Path) -> Result<Option<Cookie>> {
    let p = dir.join(COOKIE_FILE);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| BookieError::Cookie(format!("{} is not a valid cookie: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BookieError::io(format!("reading {}", p.display()), e)),
    }
}

fn write_local(dir: &Path, c: &Cookie) -> Result<()> {
    let p = dir.join(COOKIE_FILE);
    let body =
        serde_json::to_vec_pretty(c).map_err(|e| BookieError::io("encoding a cookie", std::io::Error::other(e)))?;
    let ctx = |e| BookieError::io(format!("writing {}", p.display()), e);
    let tmp = dir.join("COOKIE.tmp");
    std::fs::write(&tmp, body).map_err(ctx)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(ctx)?;
    std::fs::rename(&tmp, &p).map_err(ctx)?;
    crate::journal::segment::sync_dir(dir)
}

/// Checks (or on first start, writes) the cookies; returns the bookie's cookie.
pub async fn verify_or_format(
    meta: &MetaClient,
    bookie_id: &str,
    journal_dirs: &[PathBuf],
    ledger_dirs: &[PathBuf],
    address: &str,
) -> Result<Cookie> {
    let dirs: Vec<&PathBuf> = journal_dirs.iter().chain(ledger_dirs.iter()).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(|e| BookieError::io(format!("creating {}", d.display()), e))?;
    }
    let key = meta_key(bookie_id);
    let registered = meta.get(&key).await?;
    let stored: Option<(Cookie, u64)> = match &registered {
        Some(kv) => Some((
            serde_json::from_slice(&kv.value)
                .map_err(|e| BookieError::Cookie(format!("the metastore's cookie at {key} is unreadable: {e}")))?,
            kv.version,
        )),
        None => None,
    };
    let mut locals = Vec::new();
    for d in &dirs {
        locals.push((*d, read_local(d)?));
    }
    let expected = Cookie {
        bookie_id: bookie_id.to_owned(),
        instance_id: String::new(),
        journal_dirs: journal_dirs.to_vec(),
        ledger_dirs: ledger_dirs.to_vec(),
        address: address.to_owned(),
    };
    match stored {
        None => {
            if let Some((d, Some(c))) = locals.iter().find(|(_, c)| c.is_some()) {
                return Err(BookieError::Cookie(format!(
                    "{} holds a cookie of bookie `{}` (instance {}), but the metastore has no cookie for `{bookie_id}`: \
                     wrong metastore, or a directory from another cluster",
                    d.display(),
                    c.bookie_id,
                    c.instance_id
                )));
            }
            // A new bookie: format every directory, then register the identity.
            let cookie = Cookie { instance_id: format!("{:032x}", rand::random::<u128>()), ..expected };
            for d in &dirs {
                write_local(d, &cookie)?;
            }
            let body = serde_json::to_vec(&cookie)
                .map_err(|e| BookieError::io("encoding a cookie", std::io::Error::other(e)))?;
            meta.put(&key, body, PutOptions { expected_version: Some(0), session: 0 }).await?;
            tracing::info!(bookie_id, instance = %cookie.instance_id, "formatted new bookie directories");
            Ok(cookie)
        }
        Some((cookie, version)) => {
            let want = Cookie { instance_id: cookie.instance_id.clone(), ..expected };
            if !cookie.same_identity(&want) {
                return Err(BookieError::Cookie(format!(
                    "bookie `{bookie_id}` is registered with journal dirs {:?} and ledger dirs {:?}, but is configured \
                     with {:?} and {:?}",
                    cookie.journal_dirs, cookie.ledger_dirs, journal_dirs, ledger_dirs
                )));
            }
            for (d, local) in &locals {
                match local {
                    None => {
                        return Err(BookieError::Cookie(format!(
                            "{} has no cookie, but bookie `{bookie_id}` (instance {}) is registered with it: the \
                             directory was wiped or replaced. Its entries are gone; decommission this bookie id or \
                             restore the directory",
                            d.display(),
                            cookie.instance_id
                        )))
                    }
                    Some(c) if !c.same_identity(&cookie) => {
                        return Err(BookieError::Cookie(format!(
                            "{} belongs to bookie `{}` (instance {}), not to `{bookie_id}` (instance {})",
                            d.display(),
                            c.bookie_id,
                            c.instance_id,
                            cookie.instance_id
                        )))
                    }
                    Some(_) => {}
                }
            }
            if cookie.address != address {
                let updated = Cookie { address: address.to_owned(), ..cookie.clone() };
                let body = serde_json::to_vec(&updated)
                    .map_err(|e| BookieError::io("encoding a cookie", std::io::Error::other(e)))?;
                meta.put(&key, body, PutOptions { expected_version: Some(version), session: 0 }).await?;
            }
            Ok(cookie)
        }
    }
}
