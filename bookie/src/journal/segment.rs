//! Journal segment files: naming, listing, preallocation and recycling.
//!
//! A journal directory holds `<seq as 16 hex digits>.jseg` segments, written in sequence order,
//! and `prealloc-<n>.jfree` files waiting to become the next segment. Every segment file has
//! the same size and is normally fully written before use (zeros the first time, old records
//! when recycled): fdatasync'd writes into blocks that already exist only flush data, while
//! writes that allocate blocks also commit file-system metadata, which on common disks is
//! several times slower. The exception: when the writer needs a segment before the background
//! thread has one ready, it takes a sparse file rather than stopping to zero-fill one. Records
//! from a file's earlier life never verify (their CRC is seeded with the old sequence number),
//! so replay stops where new writes stop.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{BookieError, Result};

const SEGMENT_EXT: &str = "jseg";
pub(crate) const FREE_EXT: &str = "jfree";
/// Free segments kept beyond the preallocation target.
const MAX_RECYCLED: usize = 32;

/// Path of segment `seq` in `dir`.
pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.{SEGMENT_EXT}"))
}

/// The segments in `dir`, in sequence order.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| BookieError::io(format!("listing {}", dir.display()), e))?;
    for ent in rd {
        let ent = ent.map_err(|e| BookieError::io(format!("listing {}", dir.display()), e))?;
        let path = ent.path();
        if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXT) {
            continue;
        }
        if let Some(seq) = path.file_stem().and_then(|s| s.to_str()).and_then(|s| u64::from_str_radix(s, 16).ok()) {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes every slice, in order, at `offset` (vectored, at most `IOV_MAX` slices per call).
pub fn pwritev_all(file: &File, slices: &mut [std::io::IoSlice<'_>], offset: u64) -> std::io::Result<()> {
    /// Linux's `IOV_MAX`.
    const MAX_IOVECS: usize = 1024;
    let mut offset = offset;
    let mut rest = slices;
    while !rest.is_empty() {
        let n = rest.len().min(MAX_IOVECS);
        let wrote = match rustix::io::pwritev(file, &rest[..n], offset) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
            Ok(w) => w,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        offset += wrote as u64;
        std::io::IoSlice::advance_slices(&mut rest, wrote);
    }
    Ok(())
}

/// fsyncs a directory so renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| BookieError::io(format!("syncing {}", dir.display()), e))
}

struct Pool {
    ready: VecDeque<PathBuf>,
    next_name: u64,
    stop: bool,
    /// The segment the writer will roll to next, once known.
    next_seq: Option<u64>,
    /// A file already renamed to `next_seq` with the rename made durable, so a roll costs the
    /// writer neither a rename nor a directory fsync (which waits for the file system's
    /// journal commit, and with it for other files' pending writes).
    named: Option<(u64, PathBuf)>,
    /// A rename to this segment is in progress in the background.
    naming: Option<u64>,
}

/// Hands out full-size segment files, keeping some ready in the background.
pub struct Allocator {
    dir: PathBuf,
    size: u64,
    keep: usize,
    pool: Mutex<Pool>,
    changed: Condvar,
}

impl Allocator {
    /// Adopts any full-size free files already in `dir` and starts the preallocation thread.
    pub fn start(dir: &Path, size: u64, keep: usize) -> Result<(Arc<Self>, std::thread::JoinHandle<()>)> {
        let mut ready = VecDeque::new();
        let mut next_name = 0;
        let rd = std::fs::read_dir(dir).map_err(|e| BookieError::io(format!("listing {}", dir.display()), e))?;
        for ent in rd.flatten() {
            let path = ent.path();
            if path.extension().and_then(|e| e.to_str()) != Some(FREE_EXT) {
                continue;
            }
            let n = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.strip_prefix("prealloc-"))
                .and_then(|s| s.parse::<u64>().ok());
            let full = ent.metadata().map(|m| m.len() == size).unwrap_or(false);
            match n {
                Some(n) if full => {
                    next_name = next_name.max(n + 1);
                    ready.push_back(path);
                }
                // Half-written by a crash, or from a different segment size: start over.
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let alloc = Arc::new(Allocator {
            dir: dir.to_owned(),
            size,
            keep: keep.max(1),
            pool: Mutex::new(Pool { ready, next_name, stop: false, next_seq: None, named: None, naming: None }),
            changed: Condvar::new(),
        });
        let bg = alloc.clone();
        let handle = crate::spawn_thread("journal-prealloc", move || bg.run())?;
        Ok((alloc, handle))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        loop {
            enum Job {
                Create(u64),
                Name(u64, PathBuf),
            }
            let job = {
                let mut p = self.lock();
                loop {
                    if p.stop {
                        return;
                    }
                    if let (None, Some(seq), Some(_)) = (&p.named, p.next_seq, p.ready.front()) {
                        if let Some(free) = p.ready.pop_front() {
                            p.naming = Some(seq);
                            break Job::Name(seq, free);
                        }
                    }
                    if p.ready.len() < self.keep {
                        p.next_name += 1;
                        break Job::Create(p.next_name - 1);
                    }
                    p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
                }
            };
            let r = match job {
                Job::Create(name) => self.create(name).map(|path| self.lock().ready.push_back(path)),
                Job::Name(seq, free) => {
                    let path = segment_path(&self.dir, seq);
                    let r = std::fs::rename(&free, &path)
                        .map_err(|e| BookieError::io(format!("renaming {}", free.display()), e))
                        .and_then(|()| sync_dir(&self.dir));
                    let mut p = self.lock();
                    p.naming = None;
                    match &r {
                        Ok(()) if p.next_seq == Some(seq) => p.named = Some((seq, path)),
                        // The writer went past it meanwhile: an unused segment is harmless
                        // (replay finds no records in it) and is recycled with the rest.
                        Ok(()) => {}
                        Err(_) => p.ready.push_front(free),
                    }
                    r
                }
            };
            self.changed.notify_all();
            if let Err(e) = r {
                tracing::error!(error = %e, "preparing a journal segment failed; retrying in 1 s");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }

    /// Writes a zero-filled file of the segment size and makes it durable.
    fn create(&self, name: u64) -> Result<PathBuf> {
        let tmp = self.dir.join(format!("prealloc-{name}.tmp"));
        let path = self.dir.join(format!("prealloc-{name}.{FREE_EXT}"));
        let ctx = |e| BookieError::io(format!("preallocating {}", tmp.display()), e);
        if let Err(e) = zero_fill_direct(&tmp, self.size) {
            // File systems without direct I/O (tmpfs), or a size that is not a multiple of
            // the block size: through the page cache instead.
            tracing::debug!(error = %e, path = %tmp.display(), "direct zero-fill unavailable; writing through the page cache");
            zero_fill_buffered(&tmp, self.size).map_err(ctx)?;
        }
        std::fs::rename(&tmp, &path).map_err(ctx)?;
        Ok(path)
    }

    /// A full-size file renamed to segment `seq`, opened for reading and writing. Usually the
    /// background thread has it ready under that name already.
    pub fn take(&self, seq: u64) -> Result<File> {
        let open = |path: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| BookieError::io(format!("opening {}", path.display()), e))
        };
        let mut p = self.lock();
        // Never race the background rename onto the same name: wait for it to finish.
        while p.naming == Some(seq) {
            p = self.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        p.next_seq = Some(seq + 1);
        if let Some((named_seq, path)) = p.named.take() {
            if named_seq == seq {
                drop(p);
                self.changed.notify_all();
                return open(&path);
            }
            p.named = Some((named_seq, path));
        }
        let f = p.ready.pop_front();
        drop(p);
        self.changed.notify_all();
        let path = segment_path(&self.dir, seq);
        match f {
            Some(free) => {
                std::fs::rename(&free, &path)
                    .map_err(|e| BookieError::io(format!("renaming {}", free.display()), e))?;
            }
            // The background thread fell behind (a heavy load on a young journal, whose pool
            // of recycled segments is still growing). Zero-filling a segment here would stop
            // every add for as long as writing it takes (hundreds of ms): take a sparse file
            // instead. Its first use pays for block allocation in each fdatasync; it joins
            // the pool when recycled, fully written by then.
            None => self.create_sparse(&path)?,
        }
        sync_dir(&self.dir)?;
        open(&path)
    }

    /// A segment-size file at `path` with no blocks allocated yet.
    fn create_sparse(&self, path: &Path) -> Result<()> {
        let ctx = |e| BookieError::io(format!("creating {}", path.display()), e);
        let f = OpenOptions::new().create(true).truncate(true).write(true).open(path).map_err(ctx)?;
        f.set_len(self.size).map_err(ctx)?;
        f.sync_all().map_err(ctx)
    }

    /// Returns a segment no longer needed to the free pool (or deletes it when the pool is
    /// full or the file has a different size). The pool may grow to what the journal needed
    /// between two checkpoints, so a steady load reuses segments and allocates none.
    pub fn recycle(&self, path: &Path) {
        let full = std::fs::metadata(path).map(|m| m.len() == self.size).unwrap_or(false);
        let mut p = self.lock();
        if full && p.ready.len() < self.keep + MAX_RECYCLED {
            let to = self.dir.join(format!("prealloc-{}.{FREE_EXT}", p.next_name));
            p.next_name += 1;
            if std::fs::rename(path, &to).is_ok() {
                p.ready.push_back(to);
                return;
            }
        }
        drop(p);
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(error = %e, path = %path.display(), "removing an old journal segment failed");
        }
    }

    /// Stops the background thread.
    pub fn stop(&self) {
        self.lock().stop = true;
        self.changed.notify_all();
    }
}

/// Alignment of direct writes (offset, length and memory).
const DIRECT_ALIGN: usize = 4096;
/// Bytes per zero-filling write.
const FILL_CHUNK: usize = 1 << 20;

/// Zero-fills `path` to `size` bytes with direct I/O: the zeros go from one buffer to the disk
/// without being copied into the page cache first (that copy was most of the preallocation's
/// CPU), and leave no dirty pages behind for a later fdatasync to write.
fn zero_fill_direct(path: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if !size.is_multiple_of(DIRECT_ALIGN as u64) {
        return Err(std::io::Error::other("size is not a multiple of the direct I/O alignment"));
    }
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)?;
    let raw = vec![0u8; FILL_CHUNK + DIRECT_ALIGN];
    let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
    let zeros = raw.get(start..start + FILL_CHUNK).ok_or_else(|| std::io::Error::other("unaligned buffer"))?;
    // Direct writes leave no dirty pages: nothing to flush along the way.
    write_zeros(&mut f, zeros, size, false)
}

/// Zero-fills `path` to `size` bytes through the page cache.
fn zero_fill_buffered(path: &Path, size: u64) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).truncate(true).write(true).open(path)?;
    // Flush as we go: a pile of dirty pages here would be written out inside the journal's
    // next fdatasync (ordered-mode file systems commit them together).
    write_zeros(&mut f, &vec![0u8; FILL_CHUNK], size, true)
}

/// Writes `size` bytes from `zeros` (reused chunk by chunk), fdatasyncing every 4 MiB when
/// `sync_along` is set, then makes the file durable.
fn write_zeros(f: &mut File, zeros: &[u8], size: u64, sync_along: bool) -> std::io::Result<()> {
    let mut left = size;
    let mut unsynced = 0usize;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
        unsynced += n;
        if sync_along && unsynced >= 4 << 20 {
            f.sync_data()?;
            unsynced = 0;
        }
    }
    f.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    /// Preallocated segments are full size, all zeros and fully allocated, whether written
    /// with direct I/O or (for sizes direct I/O cannot write) through the page cache.
    #[test]
    fn preallocated_segments_are_zero_filled_and_allocated() {
        for size in [3 << 20, (2 << 20) + 100] {
            let d = tempfile::tempdir().unwrap();
            let (alloc, bg) = Allocator::start(d.path(), size, 1).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while alloc.lock().ready.is_empty() {
                assert!(std::time::Instant::now() < deadline, "no segment preallocated within 20 s");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let f = alloc.take(0).unwrap();
            alloc.stop();
            bg.join().unwrap();
            let meta = f.metadata().unwrap();
            assert_eq!(meta.len(), size);
            assert!(meta.blocks() * 512 >= size, "size {size}: only {} blocks allocated", meta.blocks());
            let mut all = vec![1u8; size as usize];
            f.read_exact_at(&mut all, 0).unwrap();
            assert!(all.iter().all(|b| *b == 0), "size {size}: not all zeros");
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("odd");
        assert!(zero_fill_direct(&p, (1 << 20) + 100).is_err(), "direct I/O cannot write a partial block");
        zero_fill_buffered(&p, (1 << 20) + 100).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), (1 << 20) + 100);
    }

    #[test]
    fn a_writer_ahead_of_preallocation_gets_a_sparse_segment_at_once() {
        let d = tempfile::tempdir().unwrap();
        let size = 4 << 20;
        let (alloc, bg) = Allocator::start(d.path(), size, 1).unwrap();
        // With the background thread gone, at most the one file it made is ready.
        alloc.stop();
        bg.join().unwrap();
        let files: Vec<File> = (0..3).map(|seq| alloc.take(seq).unwrap()).collect();
        for f in &files {
            assert_eq!(f.metadata().unwrap().len(), size, "every segment has the full size");
        }
        let last = files[2].metadata().unwrap();
        assert!(last.blocks() * 512 < size / 2, "the fallback segment is not zero-filled: {} blocks", last.blocks());
        // It is a working segment: written, read back, listed, and recycled at full size.
        files[2].write_all_at(b"record", 1 << 20).unwrap();
        let mut back = [0u8; 6];
        files[2].read_exact_at(&mut back, 1 << 20).unwrap();
        assert_eq!(&back, b"record");
        let segs = list_segments(d.path()).unwrap();
        assert_eq!(segs.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![0, 1, 2]);
        alloc.recycle(&segs[2].1);
        assert_eq!(alloc.lock().ready.len(), 1, "a full-size sparse segment is reused like any other");
    }
}
