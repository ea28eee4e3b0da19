//! openraft's storage conformance suite against the RocksDB log store and state machine.

use magnetar_metastore::store::log::LogStore;
use magnetar_metastore::store::sm::{Retention, StateMachine};
use magnetar_metastore::types::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir()
            .map_err(|e| StorageError::from_io_error(openraft::ErrorSubject::Store, openraft::ErrorVerb::Write, e))?;
        let db = match magnetar_metastore::store::open_db(dir.path()) {
            Ok(db) => db,
            Err(e) => panic!("open_db: {e}"),
        };
        let log = LogStore::new(db.clone());
        let retention = Retention { event_revisions: 10_000 };
        let sm = StateMachine::new(db, dir.path().join("snapshots"), retention)?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("openraft storage suite failed: {e}");
    }
}
