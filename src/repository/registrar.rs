//! Run-time changes of the repository: register (validate, persist, serve), unregister, pin the
//! default version, and reconcile with changes other replicas made to the shared directory.
//!
//! Callable from Rust (the admin gRPC service and any other front end) through [`Registrar`].
//! Every change holds the registry's mutation lock; ONNX Runtime work and file I/O run on
//! blocking threads, never on the reactor.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::loader::Loader;
use super::manifest::{TaskManifest, read_json, valid_name};
use super::registry::{Registry, TaskEntry, TaskState, scan_tasks};
use super::store::{self, Staging, Stamp};
use super::task::Task;
use super::trial::trial_run;
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

#[derive(Debug, Clone, Copy, Default)]
pub struct RegisterOptions {
    /// None: one above every version the task ever had (removed numbers are not reused).
    pub version: Option<u32>,
    pub set_default: bool,
    /// Allow replacing an existing version.
    pub replace: bool,
}

#[derive(Debug, Clone)]
pub struct Registered {
    pub entry: TaskEntry,
    pub validate: Duration,
}

/// Cheap to clone: every clone shares the registry, its mutation lock and the loader thread.
#[derive(Clone)]
pub struct Registrar {
    registry: Arc<Registry>,
    runtime: Runtime,
    /// Creates the sessions of run-time loads; ends with the last clone.
    loader: Loader,
}

impl Registrar {
    pub fn new(registry: Arc<Registry>, runtime: Runtime) -> Self {
        Self { registry, runtime, loader: Loader::start() }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn tasks_root(&self) -> PathBuf {
        self.registry.root().join("tasks")
    }

    /// Validates `bundle` completely, then publishes it as `tasks/<name>/<version>/` and serves it.
    /// Nothing is written to the repository or served unless every check passes. Runs to the end
    /// even if the caller stops waiting (a client that disconnects mid-commit), so the tables never
    /// miss a version that was published.
    pub async fn register(&self, name: &str, bundle: Bundle, opts: RegisterOptions) -> Result<Registered, ServeError> {
        let (this, name) = (self.clone(), name.to_string());
        detached(async move { this.register_now(&name, bundle, opts).await }).await
    }

    async fn register_now(&self, name: &str, bundle: Bundle, opts: RegisterOptions) -> Result<Registered, ServeError> {
        check_name(name)?;
        if opts.version == Some(0) {
            return Err(ServeError::InvalidArgument("version must be a positive integer (omit it for the next free one)".into()));
        }
        let _guard = self.registry.mutation.lock().await;
        let task_dir = self.tasks_root().join(name);
        let mut known: BTreeSet<u32> = self.registry.version_numbers(name);
        // Another replica may have published versions this one has not polled yet, and a removed
        // version's number is never reused: the next one is above every version ever assigned.
        let (on_disk, last) = blocking({
            let task_dir = task_dir.clone();
            move || Ok((versions_on_disk(&task_dir), store::read_last_version(&task_dir)))
        })
        .await?;
        known.extend(on_disk);
        let highest = known.last().copied().max(last).unwrap_or(0);
        let version = opts.version.unwrap_or(highest + 1);
        let exists = known.contains(&version);
        if exists && !opts.replace {
            return Err(ServeError::FailedPrecondition(format!(
                "task `{name}@{version}` already exists; set `replace` to swap it, or omit the version to get the next free one"
            )));
        }
        if !exists {
            // Visible as LOADING while it is validated.
            let placeholder = TaskEntry { name: name.into(), version, state: TaskState::Loading, manifest: None, task: None };
            self.registry.insert(placeholder, None);
        }
        let (registry, runtime, owned_name) = (self.registry.clone(), self.runtime.clone(), name.to_string());
        let started = Instant::now();
        let outcome = self
            .loader
            .run(move || {
                let (task, staged) = prepare(&registry, &runtime, &owned_name, version, &bundle)?;
                let target = registry.root().join("tasks").join(&owned_name).join(version.to_string());
                store::crash_point("before-publish");
                let published =
                    if target.is_dir() { store::publish_replace(&staged, &target) } else { store::publish_new(&staged, &target) };
                published.map_err(|e| {
                    ServeError::FailedPrecondition(format!(
                        "cannot publish `{owned_name}@{version}` (another replica may have published it first; retry): {e}"
                    ))
                })?;
                store::crash_point("after-publish");
                // Published either way; a missing record is restored by the unregister that needs it.
                if let Err(e) = store::raise_last_version(target.parent().expect("task dir"), version) {
                    tracing::warn!(task = %owned_name, version, error = %e, "cannot record the highest assigned version");
                }
                drop(bundle); // removes the staging directory, with the replaced version if any
                Ok((task, Stamp::of(&target)))
            })
            .await;
        let (task, stamp) = match outcome {
            Ok(ok) => ok,
            Err(e) => {
                if !exists {
                    self.registry.remove(name, version);
                }
                tracing::info!(task = name, version, error = %e, "registration refused");
                return Err(e);
            }
        };
        let validate = started.elapsed();
        let entry =
            TaskEntry { name: name.into(), version, state: TaskState::Ready, manifest: Some(task.manifest.clone()), task: Some(task) };
        self.registry.insert(entry.clone(), stamp);
        tracing::info!(task = name, version, replaced = exists, validate_ms = validate.as_millis() as u64, "task registered");
        if opts.set_default {
            self.pin(name, Some(version)).await?;
        }
        Ok(Registered { entry, validate })
    }

    /// Removes one version (or all of them) from disk and from service. Requests that already
    /// resolved a removed version finish on it; the returned entries show DRAINING while they run.
    pub async fn unregister(&self, name: &str, version: Option<u32>) -> Result<Vec<TaskEntry>, ServeError> {
        let (this, name) = (self.clone(), name.to_string());
        detached(async move { this.unregister_now(&name, version).await }).await
    }

    async fn unregister_now(&self, name: &str, version: Option<u32>) -> Result<Vec<TaskEntry>, ServeError> {
        check_name(name)?;
        let _guard = self.registry.mutation.lock().await;
        let task_dir = self.tasks_root().join(name);
        let loaded: BTreeSet<u32> = self.registry.version_numbers(name);
        let on_disk = blocking({
            let task_dir = task_dir.clone();
            move || Ok(versions_on_disk(&task_dir))
        })
        .await?;
        let all: BTreeSet<u32> = loaded.union(&on_disk).copied().collect();
        if all.is_empty() {
            return Err(ServeError::NotFound(format!("task `{name}` not found")));
        }
        if let Some(v) = version
            && !all.contains(&v)
        {
            return Err(ServeError::NotFound(format!("task `{name}` has no version {v}; versions: {all:?}")));
        }
        let tasks_root = self.tasks_root();
        let pinned = self.registry.pinned_version(name).or_else(|| store::read_default(&task_dir));
        blocking(move || {
            let trash = Staging::create(&tasks_root).map_err(io_error)?;
            match version {
                // One rename takes every version (and the pin) out of the repository.
                None if task_dir.exists() => store::retire(&task_dir, &trash.path().join("task")).map_err(io_error)?,
                None => {}
                Some(v) => {
                    // Before a version goes, the record must cover it, so its number is not reused.
                    let highest = all.last().copied().unwrap_or(v);
                    store::raise_last_version(&task_dir, highest).map_err(io_error)?;
                    if on_disk.contains(&v) {
                        store::retire(&task_dir.join(v.to_string()), &trash.path().join("version")).map_err(io_error)?;
                        store::crash_point("after-retire");
                    }
                    if pinned == Some(v) {
                        store::write_default(&task_dir, None).map_err(io_error)?;
                    }
                    if versions_on_disk(&task_dir).is_empty() {
                        let _ = store::write_default(&task_dir, None);
                        let _ = store::clear_last_version(&task_dir);
                        let _ = std::fs::remove_dir(&task_dir);
                    }
                }
            }
            Ok(())
        })
        .await?;
        let removed: Vec<TaskEntry> =
            version.map_or(loaded.into_iter().collect(), |v| vec![v]).into_iter().filter_map(|v| self.registry.remove(name, v)).collect();
        tracing::info!(task = name, versions = ?removed.iter().map(|e| e.version).collect::<Vec<_>>(), "task unregistered");
        Ok(removed)
    }

    /// Pins the default version (it must be ready) or removes the pin.
    pub async fn set_default(&self, name: &str, version: Option<u32>) -> Result<(), ServeError> {
        let (this, name) = (self.clone(), name.to_string());
        detached(async move { this.set_default_now(&name, version).await }).await
    }

    async fn set_default_now(&self, name: &str, version: Option<u32>) -> Result<(), ServeError> {
        check_name(name)?;
        let _guard = self.registry.mutation.lock().await;
        let entries: Vec<TaskEntry> =
            self.registry.entries().into_iter().filter(|e| e.name == name && e.state != TaskState::Draining).collect();
        if entries.is_empty() {
            return Err(ServeError::NotFound(format!("task `{name}` not found")));
        }
        if let Some(v) = version {
            match entries.iter().find(|e| e.version == v) {
                None => return Err(ServeError::NotFound(format!("task `{name}` has no version {v}"))),
                Some(e) if e.state != TaskState::Ready => {
                    return Err(ServeError::FailedPrecondition(format!(
                        "task `{name}@{v}` is not ready ({:?}); cannot make it the default",
                        e.state
                    )));
                }
                Some(_) => {}
            }
        }
        self.pin(name, version).await
    }

    async fn pin(&self, name: &str, version: Option<u32>) -> Result<(), ServeError> {
        let task_dir = self.tasks_root().join(name);
        blocking(move || store::write_default(&task_dir, version).map_err(io_error)).await?;
        self.registry.set_pinned(name, version);
        tracing::info!(task = name, pinned = ?version, "default version set");
        Ok(())
    }

    /// Brings the tables in line with the repository directory: loads versions that appeared or
    /// were replaced, drops versions that disappeared, follows DEFAULT pins. New versions are
    /// loaded before a pin moves to them, so requests never see a pinned version still loading.
    /// Returns the number of changes applied.
    pub async fn reconcile(&self) -> Result<usize, ServeError> {
        let _guard = self.registry.mutation.lock().await;
        let root = self.registry.root().to_path_buf();
        let disk = blocking(move || scan_tasks(&root).map_err(|e| ServeError::Repository(e.into()))).await?;
        let memory = self.registry.snapshot();
        let mut changes = 0;
        for (name, snap) in &disk {
            for (version, stamp) in &snap.versions {
                let known = memory.get(name).and_then(|m| m.versions.get(version));
                if known == Some(stamp) {
                    continue;
                }
                let dir = self.tasks_root().join(name).join(version.to_string());
                let (registry, runtime, name2, v) = (self.registry.clone(), self.runtime.clone(), name.clone(), *version);
                let entry = self.loader.run(move || Ok(registry.load_version(&runtime, &name2, v, &dir))).await?;
                tracing::info!(task = %name, version, state = ?entry.state, "picked up a task version from the repository");
                self.registry.insert(entry, *stamp);
                changes += 1;
            }
        }
        let empty = Default::default();
        for (name, snap) in &memory {
            let on_disk = disk.get(name).unwrap_or(&empty);
            for version in snap.versions.keys().filter(|v| !on_disk.versions.contains_key(v)) {
                tracing::info!(task = %name, version, "task version removed from the repository; unloading");
                self.registry.remove(name, *version);
                changes += 1;
            }
        }
        let names: BTreeSet<&String> = disk.keys().chain(memory.keys()).collect();
        for name in names {
            let want = disk.get(name).and_then(|s| s.pinned);
            if self.registry.pinned_version(name) != want {
                self.registry.set_pinned(name, want);
                changes += 1;
            }
        }
        Ok(changes)
    }

    /// Loads `name`'s failed versions again (their files fixed in place, which the stamp-based
    /// poll does not notice). Returns how many are ready now. KServe's RepositoryModelLoad uses it.
    pub async fn retry_failed(&self, name: &str) -> Result<usize, ServeError> {
        let _guard = self.registry.mutation.lock().await;
        let failed: Vec<u32> = self
            .registry
            .entries()
            .into_iter()
            .filter(|e| e.name == name && matches!(e.state, TaskState::Failed(_)))
            .map(|e| e.version)
            .collect();
        let mut ready = 0;
        for version in failed {
            let dir = self.tasks_root().join(name).join(version.to_string());
            let stamp = Stamp::of(&dir);
            let (registry, runtime, name2, dir2) = (self.registry.clone(), self.runtime.clone(), name.to_string(), dir.clone());
            let entry = self.loader.run(move || Ok(registry.load_version(&runtime, &name2, version, &dir2))).await?;
            tracing::info!(task = name, version, state = ?entry.state, "failed task version loaded again");
            ready += usize::from(entry.state == TaskState::Ready);
            self.registry.insert(entry, stamp);
        }
        Ok(ready)
    }

    /// Reconciles every `interval` until the returned handle is aborted.
    pub fn spawn_poller(self: Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match self.reconcile().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(changes = n, "repository poll applied changes"),
                    Err(e) => tracing::warn!(error = %e, "repository poll failed"),
                }
            }
        })
    }
}

/// Everything before publishing, on a blocking thread: layout, manifest, files, load, trial run,
/// fsync. Returns the loaded task and the staged version directory.
fn prepare(registry: &Registry, runtime: &Runtime, name: &str, version: u32, bundle: &Bundle) -> Result<(Arc<Task>, PathBuf), ServeError> {
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
    let task = Task::load(runtime, &staged, backbone).map_err(|e| invalid(relative(e.to_string())))?;
    trial_run(&task).map_err(|e| invalid(relative(e.to_string())))?;
    store::sync_tree(&staged).map_err(io_error)?;
    Ok((Arc::new(task), staged))
}

/// The header's name and version win over what task.json says.
fn rewrite_identity(path: &Path, name: &str, version: u32) -> Result<(), ServeError> {
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

fn versions_on_disk(task_dir: &Path) -> BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir(task_dir) else { return BTreeSet::new() };
    entries.flatten().filter(|e| e.path().is_dir()).filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok())).collect()
}

fn check_name(name: &str) -> Result<(), ServeError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ServeError::InvalidArgument(format!(
            "task name `{}` is not valid: use 1-64 characters [A-Za-z0-9_.-], starting with a letter or digit, without `..` or `/`",
            name.escape_debug()
        )))
    }
}

fn io_error(e: std::io::Error) -> ServeError {
    ServeError::Repository(e.into())
}

/// Runs a change on its own task: dropping the caller's future does not stop it half-way.
async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, ServeError>> + Send + 'static,
) -> Result<T, ServeError> {
    tokio::spawn(f).await.map_err(|e| ServeError::Internal(format!("repository change failed: {e}")))?
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ServeError> + Send + 'static) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ServeError::Internal(format!("background task failed: {e}")))?
}
