//! Checkpoints: the journal positions whose effects are in flushed entry-store data.
//!
//! Stored as `checkpoint.json` in the ledger directory (written to a temporary file, fsynced,
//! renamed, directory fsynced), one position per journal directory. Taking one: read each
//! journal's applied position, flush the entry store, write the file, then recycle the journal
//! segments wholly before the positions. Replay after a crash starts from the file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{BookieError, Result};
use crate::journal::segment::sync_dir;
use crate::journal::Position;

/// The checkpoint file's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Position per journal directory, in configuration order.
    pub journals: Vec<Position>,
}

fn path(ledger_dir: &Path) -> PathBuf {
    ledger_dir.join("checkpoint.json")
}

/// Reads the checkpoint (default: start of every journal).
pub fn load(ledger_dir: &Path, journals: usize) -> Result<Checkpoint> {
    let p = path(ledger_dir);
    let mut cp = match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice::<Checkpoint>(&b).map_err(|e| {
            BookieError::io(format!("parsing {}", p.display()), std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Checkpoint::default(),
        Err(e) => return Err(BookieError::io(format!("reading {}", p.display()), e)),
    };
    cp.journals.resize(journals, Position::default());
    Ok(cp)
}

/// Writes the checkpoint durably.
pub fn store(ledger_dir: &Path, cp: &Checkpoint) -> Result<()> {
    let p = path(ledger_dir);
    let tmp = ledger_dir.join("checkpoint.json.tmp");
    let body =
        serde_json::to_vec(cp).map_err(|e| BookieError::io("encoding the checkpoint", std::io::Error::other(e)))?;
    let ctx = |e| BookieError::io(format!("writing {}", tmp.display()), e);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(ctx)?;
        f.write_all(&body).map_err(ctx)?;
        f.sync_all().map_err(ctx)?;
    }
    std::fs::rename(&tmp, &p).map_err(ctx)?;
    sync_dir(ledger_dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_default() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path(), 2).unwrap().journals, vec![Position::default(); 2]);
        let cp = Checkpoint { journals: vec![Position { segment: 3, offset: 99 }] };
        store(d.path(), &cp).unwrap();
        assert_eq!(load(d.path(), 1).unwrap(), cp);
    }
}
