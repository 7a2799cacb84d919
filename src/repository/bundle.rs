//! A task bundle (one uploaded task version directory) in its private staging directory, and its
//! validation before it is published: layout, manifest, graph files checked from their bytes
//! (`graph_check`), loaded against the contracts, then a time-bounded trial run (`trial`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::graph_check::{self, OpPolicy};
use super::manifest::{MAX_MANIFEST_BYTES, TaskManifest, read_json};
use super::registry::Registry;
use super::store::{self, Staging};
use super::task::Task;
use super::trial::trial_run;
use crate::config::AdminSettings;
use crate::error::ServeError;
use crate::runtime::Runtime;

/// A task bundle (one task version directory: task.json, slot graphs, head) being assembled in a
/// private staging directory under `tasks/`. Dropping it deletes it.
#[derive(Debug)]
pub struct Bundle {
    staging: Staging,
    dir: PathBuf,
}

impl Bundle {
    /// An empty bundle directory, to be filled by the caller (the upload handler).
    pub fn create(tasks_root: &Path) -> std::io::Result<Self> {
        let staging = Staging::create(tasks_root)?;
        let dir = staging.path().join("upload");
        std::fs::create_dir(&dir)?;
        Ok(Self { staging, dir })
    }

    /// A bundle copied from an existing task version directory (for Rust callers).
    pub fn copy_of(tasks_root: &Path, src: &Path) -> std::io::Result<Self> {
        let bundle = Self::create(tasks_root)?;
        copy_tree(src, &bundle.dir)?;
        Ok(bundle)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// Bounds of the validation of an uploaded bundle.
#[derive(Debug, Clone)]
pub struct ValidationLimits {
    /// The trial run is stopped after this long (`admin.trial_timeout_ms`).
    pub trial_timeout: Duration,
    /// Operators task graphs may use (`admin.extra_task_ops` adds to the exporters' set).
    pub ops: OpPolicy,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        Self::from_settings(&AdminSettings::default())
    }
}

impl ValidationLimits {
    pub fn from_settings(admin: &AdminSettings) -> Self {
        Self { trial_timeout: Duration::from_millis(admin.trial_timeout_ms.max(1)), ops: OpPolicy::with_extra(&admin.extra_task_ops) }
    }
}

/// Everything before publishing, on a blocking thread: layout, manifest, files, graph checks,
/// load, trial run, fsync. Returns the loaded task and the staged version directory.
pub(super) fn prepare(
    registry: &Registry,
    runtime: &Runtime,
    limits: &ValidationLimits,
    name: &str,
    version: u32,
    bundle: &Bundle,
) -> Result<(Arc<Task>, PathBuf), ServeError> {
    let invalid = |m: String| ServeError::InvalidArgument(m);
    // Task::load checks that a task lives in <name>/<version>/: stage it that way.
    let staged = bundle.staging.path().join(name).join(version.to_string());
    std::fs::create_dir_all(staged.parent().expect("has parent")).map_err(io_error)?;
    std::fs::rename(&bundle.dir, &staged).map_err(io_error)?;
    let manifest_path = staged.join("task.json");
    if !manifest_path.is_file() {
        return Err(invalid("task.json: missing from the bundle (it must be at the top level)".into()));
    }
    rewrite_identity(&manifest_path, name, version)?;
    let relative = |m: String| m.replace(&format!("{}/", staged.display()), "");
    let manifest: TaskManifest = read_json(&manifest_path).map_err(|e| invalid(relative(e.to_string())))?;
    let graphs: BTreeSet<String> = manifest
        .slots
        .iter()
        .flat_map(|s| std::iter::once(s.graph.clone()).chain(s.adapters.iter().map(|a| a.graph.clone())).chain(s.up.clone()))
        .chain(manifest.head.graph.clone())
        .collect();
    let referenced = manifest.files();
    for file in files_under(&staged).map_err(io_error)? {
        if !referenced.contains(&file) {
            return Err(invalid(format!("{file}: not referenced by task.json (a bundle holds task.json and the graphs it names)")));
        }
    }
    let backbone = registry.backbone(&manifest.backbone).ok_or_else(|| {
        let known: Vec<String> = registry.backbones().iter().map(|b| b.name().to_string()).collect();
        ServeError::FailedPrecondition(format!(
            "task.json: backbone `{}` is not loaded on this server; loaded backbones: {known:?}",
            manifest.backbone
        ))
    })?;
    // From the bytes, before ONNX Runtime builds a session (which already folds constants).
    for graph in graphs.iter().filter(|g| super::fusion::inside(g)) {
        graph_check::check_file(&staged.join(graph), &limits.ops).map_err(|e| invalid(relative(e.to_string())))?;
    }
    let task = Task::load(runtime, &staged, backbone).map_err(|e| invalid(relative(e.to_string())))?;
    trial_run(&task, limits.trial_timeout).map_err(|e| invalid(relative(e.to_string())))?;
    store::sync_tree(&staged).map_err(io_error)?;
    Ok((Arc::new(task), staged))
}

/// The header's name and version win over what task.json says.
fn rewrite_identity(path: &Path, name: &str, version: u32) -> Result<(), ServeError> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if size > MAX_MANIFEST_BYTES {
        return Err(ServeError::InvalidArgument(format!(
            "task.json: {size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| ServeError::InvalidArgument(format!("task.json: cannot read: {e}")))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ServeError::InvalidArgument(format!("task.json: invalid JSON: {e}")))?;
    let obj = value.as_object_mut().ok_or_else(|| ServeError::InvalidArgument("task.json: must be a JSON object".into()))?;
    obj.insert("name".into(), name.into());
    obj.insert("version".into(), version.into());
    let out = serde_json::to_string_pretty(&value).map_err(|e| ServeError::Internal(e.to_string()))?;
    std::fs::write(path, out + "\n").map_err(io_error)
}

/// Relative '/'-separated paths of the regular files under `dir`.
fn files_under(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((d, prefix)) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let rel = format!("{prefix}{}", e.file_name().to_string_lossy());
            if e.file_type()?.is_dir() {
                stack.push((e.path(), format!("{rel}/")));
            } else {
                out.push(rel);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn io_error(e: std::io::Error) -> ServeError {
    ServeError::Repository(e.into())
}
