//! Crash-safe writes to the repository's `tasks/` tree: hidden staging directories, fsync, atomic
//! renames, the `DEFAULT` pin file, and start-up clean-up of what a killed process left behind.
//!
//! Invariant: a `tasks/<name>/<version>/` directory only ever appears or disappears by one
//! `rename(2)` (or `renameat2(RENAME_EXCHANGE)` when replacing), after every file in it was
//! fsynced, so a `kill -9` at any moment leaves the old version or the new one, never half of one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Prefix of staging directories under `tasks/`; hidden, so scans skip them.
pub const STAGING_PREFIX: &str = ".staging-";
/// The file in `tasks/<name>/` that pins the default version (decimal, one line).
pub const DEFAULT_FILE: &str = "DEFAULT";
/// The file in `tasks/<name>/` holding the highest version number ever assigned (decimal, one
/// line), so a removed version's number is never handed out again for different bytes.
pub const LAST_VERSION_FILE: &str = "LAST_VERSION";
const LOCK_FILE: &str = ".lock";

/// Identity of a task version directory as seen on disk: replaced directories get a new inode, so
/// replicas notice a replacement even when the version number stays the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    manifest_mtime_ns: i128,
}

impl Stamp {
    pub fn of(version_dir: &Path) -> Option<Self> {
        let dir = fs::metadata(version_dir).ok()?;
        let manifest = fs::metadata(version_dir.join("task.json")).ok();
        let mtime = manifest.map(|m| m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128).unwrap_or(0);
        Some(Self { dev: dir.dev(), ino: dir.ino(), manifest_mtime_ns: mtime })
    }
}

/// A private directory `tasks/.staging-<pid>-<n>/` holding an exclusive lock while it lives, so
/// start-up clean-up (of this or another replica) never deletes a staging area still in use.
/// Dropping it removes the directory and whatever is still in it.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    _lock: File,
}

impl Staging {
    pub fn create(tasks_root: &Path) -> std::io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(tasks_root)?;
        // Replicas in containers often share a pid (1): the clock and retries keep names apart.
        let mut attempt = 0;
        let dir = loop {
            let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir = tasks_root.join(format!("{STAGING_PREFIX}{}-{n}-{nanos:x}", std::process::id()));
            match fs::create_dir(&dir) {
                Ok(()) => break dir,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        let lock = OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE))?;
        lock.try_lock().map_err(|e| std::io::Error::other(format!("cannot lock {}: {e}", dir.display())))?;
        Ok(Self { dir, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove staging directory");
        }
    }
}

/// Most fsyncs [`sync_tree`] issues at once.
const SYNC_THREADS: usize = 8;

/// fsyncs every file and directory under `dir` (and `dir` itself), so a rename that publishes it
/// can never expose a file whose data is not on disk yet. The fsyncs run concurrently and all
/// finish before this returns: concurrent fsyncs share the filesystem's journal commits, so a
/// bundle of a few files costs about one commit instead of one per file (measured on the dev VM:
/// a weights-only upload, 4 files + task.json + 2 directories, RegisterTask p50 66 -> see
/// docs/benchmarks.md "Many tasks per replica").
pub fn sync_tree(dir: &Path) -> std::io::Result<()> {
    let mut paths = Vec::new();
    collect_tree(dir, &mut paths)?;
    let per_thread = paths.len().div_ceil(SYNC_THREADS).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> =
            paths.chunks(per_thread).map(|chunk| scope.spawn(move || chunk.iter().try_for_each(|p| File::open(p)?.sync_all()))).collect();
        workers.into_iter().try_for_each(|w| w.join().unwrap_or_else(|_| Err(std::io::Error::other("fsync thread panicked"))))
    })
}

/// `dir` and every file and directory under it.
fn collect_tree(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            collect_tree(&entry.path(), out)?;
        } else {
            out.push(entry.path());
        }
    }
    out.push(dir.to_path_buf());
    Ok(())
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Publishes `staged` as the new directory `target` (which must not exist yet).
pub fn publish_new(staged: &Path, target: &Path) -> std::io::Result<()> {
    let parent = target.parent().expect("target has a parent");
    if !parent.exists() {
        fs::create_dir_all(parent)?;
        sync_dir(parent.parent().expect("tasks root"))?;
    }
    // rename(2) onto an existing non-empty directory fails (ENOTEMPTY/EEXIST): another replica
    // that published the same version first wins, and we report the conflict.
    fs::rename(staged, target)?;
    sync_dir(parent)
}

/// Atomically swaps `staged` and the existing `target`; afterwards `staged` holds the old version.
pub fn publish_replace(staged: &Path, target: &Path) -> std::io::Result<()> {
    rename_exchange(staged, target)?;
    sync_dir(target.parent().expect("target has a parent"))?;
    sync_dir(staged.parent().expect("staged has a parent"))
}

fn rename_exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Moves `target` out of the repository into `trash` (inside a staging directory) with one rename.
pub fn retire(target: &Path, trash: &Path) -> std::io::Result<()> {
    fs::rename(target, trash)?;
    sync_dir(target.parent().expect("target has a parent"))
}

/// Lifecycle testing hooks, compiled only with the `fault-injection` feature (`make test` enables
/// it). When `ADAPTERDROP_CRASH_AT` names this point, the process aborts here (no destructors, no
/// clean-up; like `kill -9` at exactly this step). When `ADAPTERDROP_PAUSE_AT` is `point:millis`,
/// this step waits that long, so a test can observe the states in between (a version LOADING
/// while it is validated).
#[cfg(feature = "fault-injection")]
pub fn crash_point(point: &str) {
    if std::env::var_os("ADAPTERDROP_CRASH_AT").is_some_and(|v| v == point) {
        eprintln!("ADAPTERDROP_CRASH_AT={point}: aborting");
        std::process::abort();
    }
    let pause = std::env::var("ADAPTERDROP_PAUSE_AT").ok();
    if let Some(ms) = pause.as_deref().and_then(|v| v.strip_prefix(point)).and_then(|r| r.strip_prefix(':')).and_then(|ms| ms.parse().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Production builds: the steps are plain code, no environment variable is read.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn crash_point(_point: &str) {}

/// Reads `tasks/<name>/DEFAULT`; None when absent or unreadable (logged).
pub fn read_default(task_dir: &Path) -> Option<u32> {
    read_number(task_dir, DEFAULT_FILE)
}

/// Writes (write temp, fsync, rename, fsync dir) or removes the `DEFAULT` pin.
pub fn write_default(task_dir: &Path, version: Option<u32>) -> std::io::Result<()> {
    write_number(task_dir, DEFAULT_FILE, version)
}

/// Reads `tasks/<name>/LAST_VERSION`; None when absent or unreadable (logged).
pub fn read_last_version(task_dir: &Path) -> Option<u32> {
    read_number(task_dir, LAST_VERSION_FILE)
}

/// Raises `tasks/<name>/LAST_VERSION` to `version` (never lowers it). Written after a version is
/// published and again before one is removed, so a crash between publishing and recording cannot
/// let a removed number be handed out twice. Without a task directory there is no version to
/// protect (numbering starts over), so nothing is written.
pub fn raise_last_version(task_dir: &Path, version: u32) -> std::io::Result<()> {
    if !task_dir.is_dir() || read_last_version(task_dir).is_some_and(|last| last >= version) {
        return Ok(());
    }
    write_number(task_dir, LAST_VERSION_FILE, Some(version))
}

/// Removes the `LAST_VERSION` record (the task's last version is gone; numbering starts over).
pub fn clear_last_version(task_dir: &Path) -> std::io::Result<()> {
    write_number(task_dir, LAST_VERSION_FILE, None)
}

fn read_number(task_dir: &Path, file: &str) -> Option<u32> {
    let path = task_dir.join(file);
    let text = fs::read_to_string(&path).ok()?;
    match text.trim().parse::<u32>() {
        Ok(v) if v > 0 => Some(v),
        _ => {
            tracing::warn!(file = %path.display(), content = text.trim(), "ignoring {file} file that is not a positive version number");
            None
        }
    }
}

/// Writes `file` atomically (write temp, fsync, rename, fsync dir), or removes it for `None`.
fn write_number(task_dir: &Path, file: &str, version: Option<u32>) -> std::io::Result<()> {
    let path = task_dir.join(file);
    match version {
        Some(v) => {
            let tmp = task_dir.join(format!(".{file}.tmp-{}", std::process::id()));
            let mut f = File::create(&tmp)?;
            writeln!(f, "{v}")?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &path)?;
        }
        None => match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
    }
    sync_dir(task_dir)
}

/// Removes what killed processes left: unlocked `tasks/.staging-*` directories and stale
/// `.DEFAULT.tmp-*` / `.LAST_VERSION.tmp-*` files. A staging directory whose lock another live process holds is kept.
pub fn clean_leftovers(tasks_root: &Path) -> usize {
    let Ok(entries) = fs::read_dir(tasks_root) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with(STAGING_PREFIX) && path.is_dir() {
            if in_use(&path) {
                tracing::info!(dir = %path.display(), "staging directory in use by another process; kept");
                continue;
            }
            match fs::remove_dir_all(&path) {
                Ok(()) => {
                    removed += 1;
                    tracing::warn!(dir = %path.display(), "removed leftover staging directory of an interrupted upload");
                }
                Err(e) => tracing::warn!(dir = %path.display(), error = %e, "cannot remove leftover staging directory"),
            }
        } else if path.is_dir() && !name.starts_with('.') {
            removed += clean_default_temps(&path);
        }
    }
    removed
}

/// Removes `DEFAULT` pins that name a version directory that does not exist (an unregister of
/// an older release crashed between removing the version and its pin). Left in place, the pin
/// would silently make a later upload of that number the default. Returns how many were removed.
pub fn clear_stale_pins(tasks_root: &Path) -> usize {
    let Ok(entries) = fs::read_dir(tasks_root) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let task_dir = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') || !task_dir.is_dir() {
            continue;
        }
        let Some(v) = read_default(&task_dir) else { continue };
        if task_dir.join(v.to_string()).is_dir() {
            continue;
        }
        match write_default(&task_dir, None) {
            Ok(()) => {
                removed += 1;
                tracing::warn!(task_dir = %task_dir.display(), version = v, "removed a DEFAULT pin naming a version that does not exist");
            }
            Err(e) => tracing::warn!(task_dir = %task_dir.display(), error = %e, "cannot remove a stale DEFAULT pin"),
        }
    }
    removed
}

fn in_use(staging: &Path) -> bool {
    let Ok(f) = File::open(staging.join(LOCK_FILE)) else { return false };
    f.try_lock().is_err()
}

fn clean_default_temps(task_dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(task_dir) else { return 0 };
    let stale = |p: &Path| {
        fs::metadata(p).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > Duration::from_secs(10))
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let temp = [DEFAULT_FILE, LAST_VERSION_FILE].iter().any(|f| name.starts_with(&format!(".{f}.tmp-")));
        if temp && stale(&path) && fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_is_removed_on_drop_and_locked_while_alive() {
        let root = tempfile::tempdir().unwrap();
        let staging = Staging::create(root.path()).unwrap();
        let path = staging.path().to_path_buf();
        fs::write(path.join("x"), b"1").unwrap();
        // A live staging directory survives clean-up.
        assert_eq!(clean_leftovers(root.path()), 0);
        assert!(path.is_dir());
        drop(staging);
        assert!(!path.exists());
        // An unlocked one (its process died) is removed.
        fs::create_dir_all(root.path().join(".staging-dead/sent/1")).unwrap();
        assert_eq!(clean_leftovers(root.path()), 1);
        assert!(!root.path().join(".staging-dead").exists());
    }

    #[test]
    fn replace_swaps_directories_atomically() {
        let root = tempfile::tempdir().unwrap();
        let (a, b) = (root.path().join("a"), root.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(a.join("f"), b"new").unwrap();
        fs::write(b.join("f"), b"old").unwrap();
        publish_replace(&a, &b).unwrap();
        assert_eq!(fs::read(b.join("f")).unwrap(), b"new");
        assert_eq!(fs::read(a.join("f")).unwrap(), b"old");
        // publish_new refuses to clobber an existing version.
        assert!(publish_new(&a, &b).is_err());
    }

    #[test]
    fn last_version_only_rises_and_clears() {
        let root = tempfile::tempdir().unwrap();
        let task = root.path().join("t");
        raise_last_version(&task, 3).unwrap();
        assert!(!task.exists(), "no task directory, nothing to protect");
        fs::create_dir(&task).unwrap();
        assert_eq!(read_last_version(&task), None);
        raise_last_version(&task, 3).unwrap();
        raise_last_version(&task, 2).unwrap();
        assert_eq!(read_last_version(&task), Some(3));
        raise_last_version(&task, 5).unwrap();
        assert_eq!(read_last_version(&task), Some(5));
        clear_last_version(&task).unwrap();
        assert_eq!(read_last_version(&task), None);
    }

    /// Runs [`crash_point`] in a child copy of this test binary with `ADAPTERDROP_PAUSE_AT` (4 s, far above a loaded machine's child start-up)
    /// and `ADAPTERDROP_CRASH_AT` naming two points it passes; returns the child's exit status,
    /// stderr and run time. A child keeps the variables out of this process's other tests.
    fn run_fault_child() -> (std::process::ExitStatus, String, Duration) {
        let test = format!("{}::fault_child", module_path!().split_once("::").unwrap().1);
        let started = std::time::Instant::now();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &test, "--test-threads=1", "--nocapture"])
            .env("ADAPTERDROP_FAULT_CHILD", "1")
            .env("ADAPTERDROP_PAUSE_AT", "unit-pause:4000")
            .env("ADAPTERDROP_CRASH_AT", "unit-crash")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("running 1 test"), "the child ran no test: {stdout}");
        (out.status, String::from_utf8_lossy(&out.stderr).into_owned(), started.elapsed())
    }

    /// The child's body (a no-op unless started by [`run_fault_child`]).
    #[test]
    fn fault_child() {
        if std::env::var_os("ADAPTERDROP_FAULT_CHILD").is_some() {
            crash_point("unit-pause");
            crash_point("unit-crash");
            println!("fault child passed both points");
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    #[test]
    fn production_build_ignores_the_fault_variables() {
        let (status, stderr, took) = run_fault_child();
        assert!(status.success(), "a build without `fault-injection` obeyed ADAPTERDROP_CRASH_AT: {status} {stderr}");
        assert!(took < Duration::from_millis(4000), "a build without `fault-injection` obeyed ADAPTERDROP_PAUSE_AT: {took:?}");
    }

    #[cfg(feature = "fault-injection")]
    #[test]
    fn fault_injection_build_pauses_and_aborts_at_the_named_points() {
        use std::os::unix::process::ExitStatusExt;
        let (status, stderr, took) = run_fault_child();
        assert_eq!(status.signal(), Some(libc::SIGABRT), "{status} {stderr}");
        assert!(stderr.contains("ADAPTERDROP_CRASH_AT=unit-crash: aborting"), "{stderr}");
        assert!(took >= Duration::from_millis(4000), "no pause: {took:?}");
    }

    #[test]
    fn stale_pins_are_cleared_and_live_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        for (task, versions, pin) in [("stale", &[2u32, 3][..], 1u32), ("live", &[1, 2][..], 1)] {
            let dir = root.path().join(task);
            for v in versions {
                fs::create_dir_all(dir.join(v.to_string())).unwrap();
            }
            write_default(&dir, Some(pin)).unwrap();
        }
        assert_eq!(clear_stale_pins(root.path()), 1);
        assert_eq!(read_default(&root.path().join("stale")), None);
        assert_eq!(read_default(&root.path().join("live")), Some(1));
    }

    #[test]
    fn default_pin_round_trips() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(read_default(root.path()), None);
        write_default(root.path(), Some(3)).unwrap();
        assert_eq!(read_default(root.path()), Some(3));
        write_default(root.path(), None).unwrap();
        assert_eq!(read_default(root.path()), None);
        fs::write(root.path().join(DEFAULT_FILE), "junk").unwrap();
        assert_eq!(read_default(root.path()), None);
    }
}
