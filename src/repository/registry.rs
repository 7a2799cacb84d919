//! Every backbone and task the server knows, with each task version's lifecycle status. The task
//! tables change at run time (registration, removal, default pins, other replicas' changes);
//! requests hold `Arc<Task>`, so a version removed while they run finishes on what it resolved.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};

use tokio::sync::watch;

use super::backbone::Backbone;
use super::manifest::{TaskManifest, read_json, valid_name};
use super::store::{self, Stamp};
use super::task::Task;
use crate::error::{LoadError, RepositoryError, ServeError};
use crate::runtime::Runtime;

#[derive(Debug, Clone, PartialEq)]
pub enum TaskState {
    Loading,
    Ready,
    Failed(String),
    Draining,
}

#[derive(Debug, Clone)]
pub struct TaskEntry {
    pub name: String,
    pub version: u32,
    pub state: TaskState,
    /// Present once the manifest parsed, even if loading failed later.
    pub manifest: Option<TaskManifest>,
    pub task: Option<Arc<Task>>,
}

/// A version taken out of service whose `Arc<Task>` requests may still hold.
struct Drained {
    entry: TaskEntry,
    task: Weak<Task>,
}

#[derive(Default)]
struct Tables {
    backbones: BTreeMap<String, Arc<Backbone>>,
    tasks: BTreeMap<String, BTreeMap<u32, TaskEntry>>,
    /// Disk identity of each loaded version directory, to notice replacements by other replicas.
    stamps: BTreeMap<(String, u32), Stamp>,
    /// Default versions pinned by `tasks/<name>/DEFAULT`.
    pinned: BTreeMap<String, u32>,
    draining: Vec<Drained>,
    /// Every backbone's built-in embedding task (`super::embedding`): always ready, never on disk.
    builtin: BTreeMap<String, TaskEntry>,
}

/// What the repository holds for one task name: version directories and the pin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskSnapshot {
    pub versions: BTreeMap<u32, Option<Stamp>>,
    pub pinned: Option<u32>,
}

pub struct Registry {
    root: PathBuf,
    tables: RwLock<Tables>,
    /// Bumped on every change of the task tables; the health reporter follows it.
    changes: watch::Sender<u64>,
    /// Serialises every change of the repository and tables (removals, pins, polls, and an
    /// upload's version choice and publishing, not its validation), in this process; replicas
    /// coordinate through atomic renames only (`store`).
    pub(crate) mutation: tokio::sync::Mutex<()>,
}

impl Registry {
    /// Loads everything under `root`. Broken entries are logged and recorded as failed; healthy
    /// ones are served. Only an unreadable repository root is fatal. Leftovers of interrupted
    /// uploads (`tasks/.staging-*`) are removed first.
    pub fn open(runtime: &Runtime, root: &Path) -> Result<Self, LoadError> {
        store::clean_leftovers(&root.join("tasks"));
        store::clear_stale_pins(&root.join("tasks"));
        let mut tables = Tables::default();
        for dir in subdirs(&root.join("backbones"))? {
            match Backbone::load(runtime, &dir) {
                Ok(b) => {
                    tracing::info!(
                        backbone = b.name(),
                        architecture = b.manifest.architecture.as_str(),
                        layers = b.num_layers(),
                        hidden = b.manifest.hidden_size,
                        "backbone loaded"
                    );
                    tables.backbones.insert(b.name().to_string(), Arc::new(b));
                }
                Err(e) => tracing::error!(error = %e, "backbone refused"),
            }
        }
        tables.builtin = super::embedding::entries(&tables.backbones);
        for b in tables.backbones.values().filter_map(|b| b.banked.as_ref()) {
            b.banks.defer(true);
        }
        let scanned = scan_tasks(root)?;
        let jobs: Vec<(&String, u32)> = scanned.iter().flat_map(|(name, snap)| snap.versions.keys().map(move |v| (name, *v))).collect();
        let entries = load_tasks_parallel(runtime, &tables.backbones, root, &jobs);
        for ((name, version), (entry, stamp)) in jobs.into_iter().zip(entries) {
            if let Some(stamp) = stamp {
                tables.stamps.insert((name.clone(), version), stamp);
            }
            tables.tasks.entry(name.clone()).or_default().insert(version, entry);
        }
        for (name, snapshot) in &scanned {
            if let Some(v) = snapshot.pinned {
                tables.pinned.insert(name.clone(), v);
            }
        }
        // Write every start-up task into the adapter banks now, in one exact-size step per
        // backbone, before any batch (the engine would otherwise do it in the first one).
        for b in tables.backbones.values() {
            if let Some(banked) = &b.banked {
                banked.banks.defer(false);
                let store = banked.banks.store();
                tracing::info!(backbone = b.name(), bank_tasks = store.used(), bank_mib = store.bytes() >> 20, "adapter banks written");
            }
        }
        let (changes, _) = watch::channel(0);
        Ok(Self { root: root.to_path_buf(), tables: RwLock::new(tables), changes, mutation: tokio::sync::Mutex::new(()) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The task version a request names; without a version, the default one.
    /// `name@N` is accepted as `name` with version N (task names never contain `@`).
    pub fn resolve(&self, name: &str, version: Option<u32>) -> Result<Arc<Task>, ServeError> {
        let (name, version) = match name.split_once('@') {
            Some((n, v)) if version.is_none() => {
                let v = v
                    .parse::<u32>()
                    .map_err(|_| ServeError::InvalidArgument(format!("`{name}`: the version after `@` must be a positive integer")))?;
                (n, Some(v))
            }
            Some(_) => {
                return Err(ServeError::InvalidArgument(format!("`{name}`: give the version either as `@N` or in `version`, not both")));
            }
            None => (name, version),
        };
        let tables = self.read();
        if let Some(builtin) = tables.builtin.get(name) {
            return match version {
                None | Some(super::embedding::VERSION) => Ok(builtin.task.clone().expect("built-in tasks are loaded")),
                Some(v) => Err(RepositoryError::UnknownVersion { name: name.to_string(), version: v, known: vec![builtin.version] }.into()),
            };
        }
        let Some(versions) = tables.tasks.get(name) else {
            let known = tables.tasks.keys().cloned().collect();
            return Err(RepositoryError::UnknownTask { name: name.to_string(), known }.into());
        };
        let version = match version {
            Some(v) => v,
            None => default_version(versions, tables.pinned.get(name))
                .ok_or_else(|| RepositoryError::NoReadyVersion { name: name.to_string(), states: describe(versions) })?,
        };
        let Some(entry) = versions.get(&version) else {
            let known = versions.keys().copied().collect();
            return Err(RepositoryError::UnknownVersion { name: name.to_string(), version, known }.into());
        };
        match (&entry.state, &entry.task) {
            (TaskState::Ready, Some(task)) => Ok(task.clone()),
            (TaskState::Failed(reason), _) => {
                Err(RepositoryError::LoadFailed { name: name.to_string(), version, reason: reason.clone() }.into())
            }
            (state, _) => Err(RepositoryError::NotReady { name: name.to_string(), version, state: format!("{state:?}") }.into()),
        }
    }

    /// Every task version, sorted by name then version, then versions still draining after removal.
    pub fn entries(&self) -> Vec<TaskEntry> {
        let tables = self.read();
        let mut out: Vec<TaskEntry> = tables.tasks.values().flat_map(|v| v.values().cloned()).collect();
        out.extend(tables.builtin.values().cloned());
        out.extend(tables.draining.iter().filter(|d| d.task.strong_count() > 0).map(|d| d.entry.clone()));
        out
    }

    /// [`Self::entries`] of one task name, without cloning every other task's entry (GetTask and
    /// every RegisterTask answer ask for one name among possibly 10,000).
    pub fn entries_named(&self, name: &str) -> Vec<TaskEntry> {
        let tables = self.read();
        let mut out: Vec<TaskEntry> = tables.tasks.get(name).map(|v| v.values().cloned().collect()).unwrap_or_default();
        out.extend(tables.builtin.get(name).cloned());
        out.extend(tables.draining.iter().filter(|d| d.entry.name == name && d.task.strong_count() > 0).map(|d| d.entry.clone()));
        out
    }

    /// The version numbers loaded for `name` (any state but draining): one lookup, not a snapshot
    /// of every task (registration must not cost O(tasks)).
    pub fn version_numbers(&self, name: &str) -> std::collections::BTreeSet<u32> {
        self.read().tasks.get(name).map(|v| v.keys().copied().collect()).unwrap_or_default()
    }

    /// Every task name with a loaded version (draining ones aside) and whether a request without a
    /// version would be served; cheap (no entry clones), for the health service on every change.
    pub fn serving_names(&self) -> BTreeMap<String, bool> {
        let tables = self.read();
        tables
            .tasks
            .iter()
            .filter(|(_, v)| v.values().any(|e| e.state != TaskState::Draining))
            .map(|(name, v)| (name.clone(), default_version(v, tables.pinned.get(name)).is_some()))
            .chain(tables.builtin.keys().map(|name| (name.clone(), true)))
            .collect()
    }

    /// The version a request without one gets: the pinned version if it is ready, else the
    /// highest ready version.
    pub fn default_version(&self, name: &str) -> Option<u32> {
        let tables = self.read();
        if tables.builtin.contains_key(name) {
            return Some(super::embedding::VERSION);
        }
        tables.tasks.get(name).and_then(|v| default_version(v, tables.pinned.get(name)))
    }

    /// The version pinned by `tasks/<name>/DEFAULT`, if any.
    pub fn pinned_version(&self, name: &str) -> Option<u32> {
        self.read().pinned.get(name).copied()
    }

    pub fn backbone(&self, name: &str) -> Option<Arc<Backbone>> {
        self.read().backbones.get(name).cloned()
    }

    pub fn backbones(&self) -> Vec<Arc<Backbone>> {
        self.read().backbones.values().cloned().collect()
    }

    /// A receiver that sees a new value after every change of the task tables.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Loads a task version directory against the loaded backbones (blocking: creates sessions).
    pub fn load_version(&self, runtime: &Runtime, name: &str, version: u32, dir: &Path) -> TaskEntry {
        let backbones = self.read().backbones.clone();
        load_task(runtime, &backbones, name, version, dir)
    }

    /// What the tables hold, in the shape of [`scan_tasks`], for reconciling with the disk.
    pub fn snapshot(&self) -> BTreeMap<String, TaskSnapshot> {
        let tables = self.read();
        let mut out: BTreeMap<String, TaskSnapshot> = BTreeMap::new();
        for (name, versions) in &tables.tasks {
            let snap = out.entry(name.clone()).or_default();
            for v in versions.keys() {
                snap.versions.insert(*v, tables.stamps.get(&(name.clone(), *v)).copied());
            }
        }
        for (name, v) in &tables.pinned {
            out.entry(name.clone()).or_default().pinned = Some(*v);
        }
        out
    }

    /// Adds or replaces one version. A replaced ready version keeps serving the requests that
    /// already hold it.
    pub(crate) fn insert(&self, entry: TaskEntry, stamp: Option<Stamp>) {
        {
            let mut tables = self.write();
            let key = (entry.name.clone(), entry.version);
            match stamp {
                Some(s) => tables.stamps.insert(key, s),
                None => tables.stamps.remove(&key),
            };
            let old = tables.tasks.entry(entry.name.clone()).or_default().insert(entry.version, entry);
            if let Some(old) = old {
                retire(&mut tables, old);
            }
        }
        self.changed();
    }

    /// Takes a version out of service; returns it as listed afterwards (DRAINING while requests
    /// hold it). A pin on it is dropped.
    pub(crate) fn remove(&self, name: &str, version: u32) -> Option<TaskEntry> {
        let removed = {
            let mut tables = self.write();
            let versions = tables.tasks.get_mut(name)?;
            let old = versions.remove(&version)?;
            if versions.is_empty() {
                tables.tasks.remove(name);
            }
            tables.stamps.remove(&(name.to_string(), version));
            if tables.pinned.get(name) == Some(&version) {
                tables.pinned.remove(name);
            }
            retire(&mut tables, old)
        };
        self.changed();
        Some(removed)
    }

    /// Whether `name@version` is an upload being validated (listed as LOADING).
    pub fn is_loading(&self, name: &str, version: u32) -> bool {
        self.read().tasks.get(name).and_then(|v| v.get(&version)).is_some_and(|e| e.state == TaskState::Loading)
    }

    /// Removes the LOADING placeholder of a refused upload (not a version loaded meanwhile).
    pub(crate) fn remove_loading(&self, name: &str, version: u32) {
        if self.is_loading(name, version) {
            self.remove(name, version);
        }
    }

    pub(crate) fn set_pinned(&self, name: &str, version: Option<u32>) {
        {
            let mut tables = self.write();
            match version {
                Some(v) => tables.pinned.insert(name.to_string(), v),
                None => tables.pinned.remove(name),
            };
        }
        self.changed();
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Moves a version out of the tables: draining while requests hold it. Returns it as listed.
fn retire(tables: &mut Tables, mut old: TaskEntry) -> TaskEntry {
    tables.draining.retain(|d| d.task.strong_count() > 0);
    let Some(task) = old.task.take() else { return old };
    let weak = Arc::downgrade(&task);
    drop(task);
    if weak.strong_count() > 0 {
        old.state = TaskState::Draining;
        tables.draining.push(Drained { entry: old.clone(), task: weak });
    }
    old
}

fn default_version(versions: &BTreeMap<u32, TaskEntry>, pinned: Option<&u32>) -> Option<u32> {
    let ready = |e: &TaskEntry| e.state == TaskState::Ready;
    if let Some(p) = pinned
        && versions.get(p).is_some_and(ready)
    {
        return Some(*p);
    }
    versions.values().rev().find(|e| ready(e)).map(|e| e.version)
}

fn describe(versions: &BTreeMap<u32, TaskEntry>) -> String {
    versions.values().map(|e| format!("@{} {:?}", e.version, e.state)).collect::<Vec<_>>().join(", ")
}

/// A loaded (or refused) task version and the stamp of its directory.
type Loaded = (TaskEntry, Option<Stamp>);

/// Loads the task versions of a start-up scan on up to one thread per core (10,000 weights-only
/// tasks are 10,000 file parses; exported tasks' sessions build independently), in `jobs` order.
fn load_tasks_parallel(
    runtime: &Runtime,
    backbones: &BTreeMap<String, Arc<Backbone>>,
    root: &Path,
    jobs: &[(&String, u32)],
) -> Vec<Loaded> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16).min(jobs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut out: Vec<Option<Loaded>> = (0..jobs.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, Loaded)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((name, version)) = jobs.get(i) else { break };
                        let dir = root.join("tasks").join(name.as_str()).join(version.to_string());
                        mine.push((i, (load_task(runtime, backbones, name, *version, &dir), Stamp::of(&dir))));
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
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

fn load_task(runtime: &Runtime, backbones: &BTreeMap<String, Arc<Backbone>>, name: &str, version: u32, dir: &Path) -> TaskEntry {
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
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
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
