//! Every backbone and task the server knows, with each task version's lifecycle status. The task
//! tables change at run time (registration, removal, default pins, other replicas' changes);
//! requests hold `Arc<Task>`, so a version removed while they run finishes on what it resolved.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};

use tokio::sync::watch;

use super::backbone::Backbone;
use super::manifest::TaskManifest;
pub use super::scan::{TaskSnapshot, scan_tasks};
use super::scan::{load_task, load_tasks_parallel, subdirs};
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

/// Most changed names remembered between two looks of the health follower; beyond it, it
/// re-reads every name once.
const MAX_TOUCHED: usize = 4096;

/// Names changed since the health follower last looked.
struct Touched {
    names: BTreeSet<String>,
    /// Too many changes to list, or nobody looked yet: every name is to be re-read.
    overflow: bool,
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

pub struct Registry {
    root: PathBuf,
    tables: RwLock<Tables>,
    /// Bumped on every change of the task tables; the health reporter follows it.
    changes: watch::Sender<u64>,
    /// The names changed since the health follower last looked ([`Self::take_touched`]).
    touched: std::sync::Mutex<Touched>,
    /// Calls that walked every task ([`Self::table_walks`]).
    walks: std::sync::atomic::AtomicU64,
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
        Self::open_with(runtime, root, crate::config::RepositorySettings::default().readahead_tasks)
    }

    /// [`Registry::open`] reading `readahead` task directories ahead of the loaders (0 = none).
    pub fn open_with(runtime: &Runtime, root: &Path, readahead: usize) -> Result<Self, LoadError> {
        let started = std::time::Instant::now();
        store::clean_leftovers(&root.join("tasks"));
        store::clear_stale_pins(&root.join("tasks"));
        let cleaned = started.elapsed();
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
        let backbones = started.elapsed();
        let scanned = scan_tasks(root)?;
        let jobs: Vec<(&String, u32)> = scanned.iter().flat_map(|(name, snap)| snap.versions.keys().map(move |v| (name, *v))).collect();
        let scan = started.elapsed();
        // A bank row for every version found (on every banked backbone: rows never written stay
        // untouched zero pages and are released below), so tasks go into their rows as they load.
        for b in tables.backbones.values().filter_map(|b| b.banked.as_ref()) {
            b.banks.reserve(jobs.len());
        }
        let entries = load_tasks_parallel(runtime, &tables.backbones, root, &jobs, readahead);
        let load = started.elapsed();
        let jobs_len = jobs.len();
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
        // Every start-up task is in the adapter banks now, before any batch; rows reserved for
        // versions that failed or belong to another backbone are given back.
        for b in tables.backbones.values() {
            if let Some(banked) = &b.banked {
                banked.banks.reserve(0);
                let store = banked.banks.store();
                tracing::info!(backbone = b.name(), bank_tasks = store.used(), bank_mib = store.bytes() >> 20, "adapter banks written");
            }
        }
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        tracing::info!(
            task_versions = jobs_len,
            clean_ms = ms(cleaned),
            backbones_ms = ms(backbones - cleaned),
            scan_ms = ms(scan - backbones),
            load_ms = ms(load - scan),
            banks_ms = ms(started.elapsed() - load),
            "repository opened"
        );
        let (changes, _) = watch::channel(0);
        let touched = std::sync::Mutex::new(Touched { names: BTreeSet::new(), overflow: true });
        Ok(Self {
            root: root.to_path_buf(),
            tables: RwLock::new(tables),
            changes,
            touched,
            walks: Default::default(),
            mutation: tokio::sync::Mutex::new(()),
        })
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
        let tables = self.walk();
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
    pub fn version_numbers(&self, name: &str) -> BTreeSet<u32> {
        self.read().tasks.get(name).map(|v| v.keys().copied().collect()).unwrap_or_default()
    }

    /// Every task name with a loaded version (draining ones aside) and whether a request without a
    /// version would be served; cheap (no entry clones), for the health service on every change.
    pub fn serving_names(&self) -> BTreeMap<String, bool> {
        let tables = self.walk();
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
        let tables = self.walk();
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
        let name = entry.name.clone();
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
        self.changed(&name);
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
        self.changed(name);
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
        self.changed(name);
    }

    /// Records that `name` changed, then wakes the followers (in that order: a follower that
    /// takes the touched names after its wake-up never misses one).
    fn changed(&self, name: &str) {
        {
            let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
            if !t.overflow && !t.names.contains(name) {
                if t.names.len() >= MAX_TOUCHED {
                    t.overflow = true;
                    t.names.clear();
                } else {
                    t.names.insert(name.to_string());
                }
            }
        }
        self.changes.send_modify(|n| *n += 1);
    }

    /// The task names whose versions or pin changed since the last call, or None when every
    /// name must be looked at again (the first call, or more than [`MAX_TOUCHED`] names changed
    /// in between). One consumer: the health follower (`api::health`), so a registration among
    /// 10,000 tasks costs it one lookup, not a walk over every name.
    pub fn take_touched(&self) -> Option<BTreeSet<String>> {
        let mut t = self.touched.lock().unwrap_or_else(|p| p.into_inner());
        let names = std::mem::take(&mut t.names);
        (!std::mem::replace(&mut t.overflow, false)).then_some(names)
    }

    /// [`Self::serving_names`] of one name: None when it has no loaded version (draining ones
    /// aside), else whether a request without a version would be served.
    pub fn serving(&self, name: &str) -> Option<bool> {
        let tables = self.read();
        if tables.builtin.contains_key(name) {
            return Some(true);
        }
        let versions = tables.tasks.get(name).filter(|v| v.values().any(|e| e.state != TaskState::Draining))?;
        Some(default_version(versions, tables.pinned.get(name)).is_some())
    }

    /// How many calls so far walked every task version ([`Self::entries`], [`Self::serving_names`],
    /// [`Self::snapshot`]): a registration, removal or pin must cost none, whatever the number
    /// of tasks (10,000 per replica, issue 12); ListTasks, metrics and polls do.
    pub fn table_walks(&self) -> u64 {
        self.walks.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn walk(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.walks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.read()
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
