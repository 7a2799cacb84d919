//! Every backbone and task the server knows, with each task version's lifecycle status.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::backbone::Backbone;
use super::manifest::{TaskManifest, read_json, valid_name};
use super::task::Task;
use crate::error::{LoadError, ServeError};
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

#[derive(Default)]
struct Tables {
    backbones: BTreeMap<String, Arc<Backbone>>,
    tasks: BTreeMap<String, BTreeMap<u32, TaskEntry>>,
}

pub struct Registry {
    root: PathBuf,
    tables: RwLock<Tables>,
}

impl Registry {
    /// Loads everything under `root`. Broken entries are logged and recorded as failed; healthy
    /// ones are served. Only an unreadable repository root is fatal.
    pub fn open(runtime: &Runtime, root: &Path) -> Result<Self, LoadError> {
        let mut tables = Tables::default();
        for dir in subdirs(&root.join("backbones"))? {
            match Backbone::load(runtime, &dir) {
                Ok(b) => {
                    tracing::info!(backbone = b.name(), layers = b.num_layers(), hidden = b.manifest.hidden_size, "backbone loaded");
                    tables.backbones.insert(b.name().to_string(), Arc::new(b));
                }
                Err(e) => tracing::error!(error = %e, "backbone refused"),
            }
        }
        for task_dir in subdirs(&root.join("tasks"))? {
            let name = task_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !valid_name(&name) {
                tracing::warn!(dir = %task_dir.display(), "ignoring task directory with an invalid name");
                continue;
            }
            for version_dir in subdirs(&task_dir)? {
                let Some(version) = version_dir.file_name().and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok()) else {
                    tracing::warn!(dir = %version_dir.display(), "ignoring task version directory that is not a number");
                    continue;
                };
                let entry = load_task(runtime, &tables.backbones, &name, version, &version_dir);
                tables.tasks.entry(name.clone()).or_default().insert(version, entry);
            }
        }
        Ok(Self { root: root.to_path_buf(), tables: RwLock::new(tables) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The task version a request names; without a version, the highest ready one.
    pub fn resolve(&self, name: &str, version: Option<u32>) -> Result<Arc<Task>, ServeError> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        let Some(versions) = tables.tasks.get(name) else {
            let known: Vec<&String> = tables.tasks.keys().collect();
            return Err(ServeError::NotFound(format!("task `{name}` not found; known tasks: {known:?}")));
        };
        let version = match version {
            Some(v) => v,
            None => default_version(versions).ok_or_else(|| {
                ServeError::FailedPrecondition(format!("task `{name}` has no ready version: {}", describe(versions)))
            })?,
        };
        let Some(entry) = versions.get(&version) else {
            let known: Vec<&u32> = versions.keys().collect();
            return Err(ServeError::NotFound(format!("task `{name}` has no version {version}; versions: {known:?}")));
        };
        match (&entry.state, &entry.task) {
            (TaskState::Ready, Some(task)) => Ok(task.clone()),
            (TaskState::Failed(reason), _) => {
                Err(ServeError::FailedPrecondition(format!("task `{name}@{version}` failed to load: {reason}")))
            }
            (state, _) => Err(ServeError::Unavailable(format!("task `{name}@{version}` is not ready ({state:?})"))),
        }
    }

    /// Every task version, sorted by name then version.
    pub fn entries(&self) -> Vec<TaskEntry> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        tables.tasks.values().flat_map(|v| v.values().cloned()).collect()
    }

    /// The version a request without one gets.
    pub fn default_version(&self, name: &str) -> Option<u32> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        tables.tasks.get(name).and_then(default_version)
    }

    pub fn backbone(&self, name: &str) -> Option<Arc<Backbone>> {
        self.tables.read().unwrap_or_else(|p| p.into_inner()).backbones.get(name).cloned()
    }

    pub fn backbones(&self) -> Vec<Arc<Backbone>> {
        self.tables.read().unwrap_or_else(|p| p.into_inner()).backbones.values().cloned().collect()
    }
}

fn default_version(versions: &BTreeMap<u32, TaskEntry>) -> Option<u32> {
    versions.values().rev().find(|e| e.state == TaskState::Ready).map(|e| e.version)
}

fn describe(versions: &BTreeMap<u32, TaskEntry>) -> String {
    versions.values().map(|e| format!("@{} {:?}", e.version, e.state)).collect::<Vec<_>>().join(", ")
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

/// Sub-directories in name order, skipping hidden ones (in-progress uploads start with `.`).
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| LoadError::new(dir, format!("cannot list: {e}")))? {
        let entry = entry.map_err(|e| LoadError::new(dir, format!("cannot list: {e}")))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if entry.path().is_dir() && !hidden {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}
