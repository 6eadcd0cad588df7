//! The disk reserve: the log never meets a full disk.
//!
//! sled 0.34 does not survive running out of space: a flush that fails half-way can leave its
//! files so that every later open fails ("Read corrupted data"), and with them every record
//! acknowledged before. So the engine stops writing first. Before each batch it asks the file
//! system how much space is free in the data dir (`statvfs`, a microsecond); under the reserve
//! (`engine.disk_reserve`) it stages nothing, refuses commands as `unavailable` and keeps the
//! other inputs in memory until space is back (docs/engine.md, Full disk).
//!
//! The reserve is also held on disk: a file of its size, `<data dir>/disk-reserve`, allocated
//! while there is room for it. When free space falls under the reserve anyway (another program
//! filled the disk), the file is deleted at once, so that what sled already holds in memory and
//! flushes in the background (what earlier commits staged) has room to land whole. The file is
//! made again when twice the reserve is free, and the engine goes on only then: the reserve is
//! held again, and the hysteresis keeps it from flapping.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The reserve when none is configured: 64 MiB.
pub const DEFAULT_RESERVE: u64 = 64 << 20;

/// The name of the file that holds the reserve, in the data dir.
pub const RESERVE_FILE: &str = "disk-reserve";

/// How free space is read: bytes available to this process on the file system of a path.
pub type FreeSpace = Arc<dyn Fn(&Path) -> io::Result<u64> + Send + Sync>;

/// The free space of the file system holding `path`, as `statvfs` tells it (blocks available to
/// unprivileged users, so root's reserved blocks are not counted as free).
#[allow(unsafe_code)]
pub fn statvfs_free(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the right type for statvfs to fill.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Free space under the reserve: what the engine refuses work for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskLow {
    /// The data dir.
    pub path: PathBuf,
    /// Bytes free when it was seen (before the reserve file was released).
    pub free: u64,
    /// The reserve, in bytes.
    pub reserve: u64,
}

impl std::fmt::Display for DiskLow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the disk of the data dir {} has {} free, under the reserve of {} (engine.disk_reserve): free space on it; callbus goes on by itself once {} are free",
            self.path.display(),
            mib(self.free),
            mib(self.reserve),
            mib(2 * self.reserve)
        )
    }
}

/// `n` bytes in words, in MiB with one decimal.
pub fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// Watches the free space of a data dir against a reserve (see the module's doc).
#[derive(Clone)]
pub struct DiskGuard {
    dir: PathBuf,
    reserve: u64,
    free: FreeSpace,
}

impl std::fmt::Debug for DiskGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskGuard").field("dir", &self.dir).field("reserve", &self.reserve).finish_non_exhaustive()
    }
}

impl DiskGuard {
    /// A guard of `dir` with `reserve` bytes (0: off), reading free space with `statvfs`.
    pub fn new(dir: &Path, reserve: u64) -> DiskGuard {
        DiskGuard::with_free_space(dir, reserve, Arc::new(statvfs_free))
    }

    /// A guard reading free space with `free` (tests give a file system of their own).
    pub fn with_free_space(dir: &Path, reserve: u64, free: FreeSpace) -> DiskGuard {
        DiskGuard { dir: dir.to_owned(), reserve, free }
    }

    /// The reserve, in bytes.
    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    fn reserve_file(&self) -> PathBuf {
        self.dir.join(RESERVE_FILE)
    }

    fn free_now(&self) -> Option<u64> {
        match (self.free)(&self.dir) {
            Ok(free) => Some(free),
            Err(e) => {
                // Not knowing is not a reason to stop: the log's own errors still stop the engine.
                tracing::debug!(path = %self.dir.display(), error = %e, "free space unknown");
                None
            }
        }
    }

    /// Whether the engine may write now. Under the reserve: the reserve file is released and
    /// the shortfall returned.
    pub fn check(&self) -> Result<(), DiskLow> {
        if self.reserve == 0 {
            return Ok(());
        }
        let Some(free) = self.free_now() else { return Ok(()) };
        metrics::gauge!("callbus_engine_disk_free_bytes").set(free as f64);
        if free >= self.reserve {
            return Ok(());
        }
        self.release();
        Err(DiskLow { path: self.dir.clone(), free, reserve: self.reserve })
    }

    /// Whether the engine may go on after a [`DiskLow`]: twice the reserve free, the reserve
    /// file made again (when the file system allows it). Returns the shortfall otherwise.
    pub fn resume(&self) -> Result<(), DiskLow> {
        if self.reserve == 0 {
            return Ok(());
        }
        let Some(free) = self.free_now() else { return Ok(()) };
        if free < 2 * self.reserve && !self.reserve_file().exists() {
            return Err(DiskLow { path: self.dir.clone(), free, reserve: self.reserve });
        }
        self.hold();
        self.check()
    }

    /// Makes the reserve file when it is missing and there is room for it and the reserve
    /// beside it. Failing to make it is said and is not fatal.
    pub fn hold(&self) {
        if self.reserve == 0 || self.reserve_file().exists() {
            return;
        }
        let Some(free) = self.free_now() else { return };
        if free < 2 * self.reserve {
            tracing::warn!(
                path = %self.dir.display(),
                free = %mib(free),
                reserve = %mib(self.reserve),
                "not enough free space to hold the disk reserve in a file: it is made once twice the reserve is free"
            );
            return;
        }
        if let Err(e) = allocate(&self.reserve_file(), self.reserve) {
            let _ = std::fs::remove_file(self.reserve_file());
            tracing::warn!(path = %self.reserve_file().display(), error = %e, "the disk reserve file could not be made; the reserve is still kept by refusing work");
        }
    }

    /// Deletes the reserve file; true when there was one.
    fn release(&self) -> bool {
        match std::fs::remove_file(self.reserve_file()) {
            Ok(()) => {
                tracing::warn!(path = %self.reserve_file().display(), "free space under the reserve: the disk reserve file is released so that the log's writes in flight land whole");
                true
            }
            Err(_) => false,
        }
    }
}

/// Makes `path` a file of `len` bytes whose blocks are allocated (not a sparse file).
#[allow(unsafe_code)]
fn allocate(path: &Path, len: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    let len = i64::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "reserve too large"))?;
    // SAFETY: a valid open descriptor, offset 0 and a positive length.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A file system whose free space the test sets; the reserve file takes `reserve` of it.
    fn guard(dir: &Path, reserve: u64) -> (DiskGuard, Arc<AtomicU64>) {
        let free = Arc::new(AtomicU64::new(0));
        let f = Arc::clone(&free);
        let probe: FreeSpace = Arc::new(move |dir: &Path| {
            let held = if dir.join(RESERVE_FILE).exists() { reserve } else { 0 };
            Ok(f.load(Ordering::SeqCst).saturating_sub(held))
        });
        (DiskGuard::with_free_space(dir, reserve, probe), free)
    }

    #[test]
    fn the_reserve_is_held_in_a_file_when_there_is_room() {
        let dir = tempfile::tempdir().expect("tmp");
        let (g, free) = guard(dir.path(), 100);
        free.store(150, Ordering::SeqCst);
        g.hold();
        assert!(!dir.path().join(RESERVE_FILE).exists(), "no room for reserve + file");
        free.store(1000, Ordering::SeqCst);
        g.hold();
        let len = std::fs::metadata(dir.path().join(RESERVE_FILE)).expect("made").len();
        assert_eq!(len, 100);
        assert_eq!(g.check(), Ok(()));
    }

    #[test]
    fn under_the_reserve_work_stops_and_the_file_is_released() {
        let dir = tempfile::tempdir().expect("tmp");
        let (g, free) = guard(dir.path(), 100);
        free.store(1000, Ordering::SeqCst);
        g.hold();
        free.store(150, Ordering::SeqCst); // 50 free beside the file
        let low = g.check().expect_err("under the reserve");
        assert!(!dir.path().join(RESERVE_FILE).exists(), "released");
        assert_eq!(low.free, 50, "what was free when it was seen");
        let text = low.to_string();
        assert!(text.contains("engine.disk_reserve") && text.contains("free space"), "{text}");
        // Back over the reserve but not twice it: still waiting, so the file can be made again.
        assert!(g.resume().is_err());
        free.store(250, Ordering::SeqCst);
        assert_eq!(g.resume(), Ok(()));
        assert!(dir.path().join(RESERVE_FILE).exists(), "held again");
    }

    #[test]
    fn without_a_file_the_threshold_alone_holds() {
        let dir = tempfile::tempdir().expect("tmp");
        let (g, free) = guard(dir.path(), 100);
        free.store(99, Ordering::SeqCst);
        assert!(g.check().is_err());
        free.store(100, Ordering::SeqCst);
        assert_eq!(g.check(), Ok(()));
    }

    #[test]
    fn a_zero_reserve_is_off_and_an_unknown_free_space_does_not_stop() {
        let dir = tempfile::tempdir().expect("tmp");
        let (g, free) = guard(dir.path(), 0);
        free.store(0, Ordering::SeqCst);
        assert_eq!(g.check(), Ok(()));
        g.hold();
        assert!(!dir.path().join(RESERVE_FILE).exists());
        let failing: FreeSpace = Arc::new(|_: &Path| Err(io::Error::other("no statvfs")));
        let g = DiskGuard::with_free_space(dir.path(), 100, failing);
        assert_eq!(g.check(), Ok(()));
    }

    #[test]
    fn statvfs_reads_a_real_file_system() {
        let dir = tempfile::tempdir().expect("tmp");
        let free = statvfs_free(dir.path()).expect("statvfs");
        assert!(free > 0);
        let e = statvfs_free(&dir.path().join("no-such-dir")).expect_err("missing");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
