//! Reading the repository's `tasks/` tree: the scan of version directories and pins (start-up and
//! every poll) and the loading of task versions, on a bounded pool of threads at start-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::backbone::Backbone;
use super::manifest::{TaskManifest, read_json, valid_name};
use super::readahead;
use super::registry::{TaskEntry, TaskState};
use super::store::{self, Stamp};
use super::task::Task;
use crate::error::LoadError;
use crate::runtime::Runtime;

/// What the repository holds for one task name: version directories and the pin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskSnapshot {
    pub versions: BTreeMap<u32, Option<Stamp>>,
    pub pinned: Option<u32>,
}

/// A loaded (or refused) task version and the stamp of its directory.
pub(super) type Loaded = (TaskEntry, Option<Stamp>);

/// Loads the task versions of a start-up scan on up to one thread per core (10,000 weights-only
/// tasks are 10,000 file parses; exported tasks' sessions build independently), in `jobs` order.
/// More threads than cores did not help: 2,000 MiniLM tasks loaded in the same time on 2 or 4
/// threads on 2 cores, with their files in the page cache or not (docs/benchmarks.md); what a cold
/// start lacked was reads in flight, which [`readahead`] adds.
pub(super) fn load_tasks_parallel(
    runtime: &Runtime,
    backbones: &BTreeMap<String, Arc<Backbone>>,
    root: &Path,
    jobs: &[(&String, u32)],
    readahead: usize,
) -> Vec<Loaded> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16).min(jobs.len().max(1));
    let dirs: Vec<PathBuf> = jobs.iter().map(|(name, version)| root.join("tasks").join(name.as_str()).join(version.to_string())).collect();
    let progress = readahead::Progress::default();
    // One task needs no read-ahead; a start-up of many reads ahead and drops what it loaded.
    let ahead = jobs.len() > 1 && readahead > 0;
    let mut out: Vec<Option<Loaded>> = (0..jobs.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, Loaded)>> = std::thread::scope(|scope| {
        let reader = ahead.then(|| scope.spawn(|| readahead::run(&dirs, readahead, &progress)));
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = progress.taken.fetch_add(1, Ordering::Relaxed);
                        let (Some((name, version)), Some(dir)) = (jobs.get(i), dirs.get(i)) else { break };
                        mine.push((i, (load_task(runtime, backbones, name, *version, dir), Stamp::of(dir))));
                        if ahead {
                            readahead::done_with(dir);
                        }
                    }
                    mine
                })
            })
            .collect();
        let done = workers.into_iter().map(|w| w.join().unwrap_or_default()).collect();
        progress.done.store(true, Ordering::Relaxed);
        if let Some(reader) = reader {
            let _ = reader.join();
        }
        done
    });
    tracing::debug!(files = progress.files.load(Ordering::Relaxed), "task files read ahead");
    for (i, loaded) in done.into_iter().flatten() {
        out[i] = Some(loaded);
    }
    out.into_iter()
        .zip(jobs)
        .map(|(loaded, (name, version))| {
            loaded.unwrap_or_else(|| {
                let reason = "loading panicked".to_string();
                (TaskEntry { name: (*name).clone(), version: *version, state: TaskState::Failed(reason), manifest: None, task: None }, None)
            })
        })
        .collect()
}

pub(super) fn load_task(runtime: &Runtime, backbones: &BTreeMap<String, Arc<Backbone>>, name: &str, version: u32, dir: &Path) -> TaskEntry {
    let mut entry = TaskEntry { name: name.to_string(), version, state: TaskState::Loading, manifest: None, task: None };
    let manifest_path = dir.join("task.json");
    let result = read_json::<TaskManifest>(&manifest_path).and_then(|m| {
        entry.manifest = Some(m.clone());
        let backbone = backbones.get(&m.backbone).cloned().ok_or_else(|| {
            LoadError::new(&manifest_path, format!("backbone `{}` is not loaded (missing or refused at start-up)", m.backbone))
        })?;
        Task::load(runtime, dir, backbone)
    });
    match result {
        Ok(task) => {
            tracing::info!(task = name, version, slots = task.slots.len(), drop = ?task.manifest.drop, "task ready");
            entry.task = Some(Arc::new(task));
            entry.state = TaskState::Ready;
        }
        Err(e) => {
            tracing::error!(task = name, version, error = %e, "task refused");
            entry.state = TaskState::Failed(e.to_string());
        }
    }
    entry
}

/// The task version directories and pins under `<root>/tasks` (names checked, hidden skipped).
pub fn scan_tasks(root: &Path) -> Result<BTreeMap<String, TaskSnapshot>, LoadError> {
    let mut out = BTreeMap::new();
    for task_dir in subdirs(&root.join("tasks"))? {
        let name = task_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if !valid_name(&name) {
            tracing::warn!(dir = %task_dir.display(), "ignoring task directory with an invalid name");
            continue;
        }
        let mut snap = TaskSnapshot::default();
        for version_dir in subdirs(&task_dir)? {
            match version_dir.file_name().and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()) {
                Some(version) => {
                    snap.versions.insert(version, Stamp::of(&version_dir));
                }
                None => tracing::warn!(dir = %version_dir.display(), "ignoring task version directory that is not a number"),
            }
        }
        // A pin naming a version that is not there is ignored (`clear_stale_pins` removes it).
        snap.pinned = store::read_default(&task_dir).filter(|v| snap.versions.contains_key(v));
        if !snap.versions.is_empty() {
            out.insert(name, snap);
        }
    }
    Ok(out)
}

/// Sub-directories in name order, skipping hidden ones (in-progress uploads start with `.`).
pub(super) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // Absent, or removed by another replica between two scans.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LoadError::new(dir, format!("cannot list: {e}"))),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LoadError::new(dir, format!("cannot list: {e}")))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if entry.path().is_dir() && !hidden {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}
