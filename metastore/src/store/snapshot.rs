//! Snapshots: the whole state machine (every state-machine column family) read through one
//! RocksDB snapshot and encoded with bincode, kept as one file per node.
//!
//! File format (`current.snap`): bincode of `(SnapshotMeta, Vec<u8> data)`; data is bincode of
//! [`Image`]. The file is written to a temporary name, fsynced and renamed, so a crash leaves
//! either the old or the new snapshot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftSnapshotBuilder, Snapshot, SnapshotMeta};
use openraft::StoredMembership;
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use super::sm::{APPLIED, MEMBERSHIP};
use super::{blocking, cf, handle, sto_read, sto_write};
use crate::types::{LogId, NodeId, StorageError, TypeConfig};

const FILE: &str = "current.snap";

/// One column family's raw `(key, value)` rows.
type Rows = Vec<(Vec<u8>, Vec<u8>)>;

/// The raw contents of every state-machine column family.
#[derive(Serialize, Deserialize)]
struct Image {
    families: Vec<(String, Rows)>,
}

type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// Builds snapshots from the live database.
pub struct SnapshotBuilder {
    db: Arc<DB>,
    dir: PathBuf,
}

impl SnapshotBuilder {
    pub(crate) fn new(db: Arc<DB>, dir: PathBuf) -> Self {
        SnapshotBuilder { db, dir }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let db = self.db.clone();
        let dir = self.dir.clone();
        blocking(move || {
            let (meta, data) = build(&db)?;
            save(&dir, &meta, &data)?;
            Ok(Snapshot { meta, snapshot: Box::new(std::io::Cursor::new(data)) })
        })
        .await
    }
}

fn build(db: &DB) -> Result<(Meta, Vec<u8>), StorageError> {
    let snap = db.snapshot();
    let mut families = Vec::new();
    let mut applied: Option<LogId> = None;
    let mut membership = StoredMembership::default();
    for name in cf::STATE_MACHINE {
        let mut rows = Vec::new();
        for item in snap.iterator_cf(handle(db, name), rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(sto_read)?;
            if name == cf::SM_META && &*k == APPLIED {
                applied = bincode::deserialize(&v).map_err(sto_read)?;
            }
            if name == cf::SM_META && &*k == MEMBERSHIP {
                membership = bincode::deserialize(&v).map_err(sto_read)?;
            }
            rows.push((k.to_vec(), v.to_vec()));
        }
        families.push((name.to_owned(), rows));
    }
    let data = bincode::serialize(&Image { families }).map_err(sto_write)?;
    let snapshot_id = match applied {
        Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, data.len()),
        None => format!("0-0-{}", data.len()),
    };
    Ok((Meta { last_log_id: applied, last_membership: membership, snapshot_id }, data))
}

/// Replaces the state machine's contents with a snapshot's.
pub(crate) fn install(db: &DB, meta: &Meta, data: &[u8]) -> Result<(), StorageError> {
    let image: Image = bincode::deserialize(data).map_err(sto_read)?;
    let mut batch = WriteBatch::default();
    // No stored key starts with 32 0xff bytes: keys are UTF-8 or big-endian numbers.
    let end = [0xffu8; 32];
    for name in cf::STATE_MACHINE {
        batch.delete_range_cf(handle(db, name), &[][..], &end[..]);
    }
    for (name, rows) in image.families {
        let Some(h) = cf::STATE_MACHINE.iter().find(|n| **n == name).map(|n| handle(db, n)) else {
            return Err(sto_read(std::io::Error::other(format!("snapshot holds unknown family {name}"))));
        };
        for (k, v) in rows {
            batch.put_cf(h, k, v);
        }
    }
    let meta_cf = handle(db, cf::SM_META);
    batch.put_cf(meta_cf, APPLIED, bincode::serialize(&meta.last_log_id).map_err(sto_write)?);
    batch.put_cf(meta_cf, MEMBERSHIP, bincode::serialize(&meta.last_membership).map_err(sto_write)?);
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo).map_err(sto_write)
}

/// Serializes writers of the snapshot file: a build and an install can run at once.
static SAVE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Stores a snapshot durably as the node's current one, unless the one already saved is newer.
pub(crate) fn save(dir: &Path, meta: &Meta, data: &[u8]) -> Result<(), StorageError> {
    let _guard = SAVE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(existing) = load_meta(dir)? {
        if existing.last_log_id > meta.last_log_id {
            return Ok(());
        }
    }
    let tmp = dir.join(format!("{FILE}.tmp"));
    let bytes = bincode::serialize(&(meta, data)).map_err(sto_write)?;
    let mut f = std::fs::File::create(&tmp).map_err(sto_write)?;
    f.write_all(&bytes).map_err(sto_write)?;
    f.sync_all().map_err(sto_write)?;
    std::fs::rename(&tmp, dir.join(FILE)).map_err(sto_write)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(sto_write)
}

/// Reads only the metadata of the current snapshot (the file's prefix), if one was saved.
pub(crate) fn load_meta(dir: &Path) -> Result<Option<Meta>, StorageError> {
    let f = match std::fs::File::open(dir.join(FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(sto_read(e)),
    };
    // The file is bincode of `(meta, data)`: the meta decodes from the front alone.
    let meta: Meta = bincode::deserialize_from(std::io::BufReader::new(f)).map_err(sto_read)?;
    Ok(Some(meta))
}

/// Loads the current snapshot, if one was saved.
pub(crate) fn load(dir: &Path) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
    let bytes = match std::fs::read(dir.join(FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(sto_read(e)),
    };
    let (meta, data): (Meta, Vec<u8>) = bincode::deserialize(&bytes).map_err(sto_read)?;
    Ok(Some(Snapshot { meta, snapshot: Box::new(std::io::Cursor::new(data)) }))
}
