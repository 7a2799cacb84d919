//! Run-time changes of the repository: register (validate, persist, serve), unregister, pin the
//! default version, and reconcile with changes other replicas made to the shared directory.
//!
//! Callable from Rust (the admin gRPC service and any other front end) through [`Registrar`].
//! Every change of the repository and tables holds the registry's mutation lock, but only
//! briefly: an upload's validation (graph checks, load, trial run) runs without it, so one slow
//! upload never holds up other registrations, removals, pins or polls. ONNX Runtime work and
//! file I/O run on blocking threads, never on the reactor.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::bundle::{self, Bundle, ValidationLimits};
use super::loader::{Loader, LoaderPool};
use super::manifest::valid_name;
use super::registry::{Registry, TaskEntry, TaskState, scan_tasks};
use super::store::{self, Staging, Stamp};
use crate::error::ServeError;
use crate::runtime::Runtime;

/// Highest version number a client may give (`i32::MAX`, so every client's integer type holds
/// it); numbers handed out automatically stop there too, with an error that says what to do.
pub const MAX_VERSION: u32 = i32::MAX as u32;
/// Uploads validated at the same time; more wait for a turn (validation holds no lock).
const PARALLEL_VALIDATIONS: usize = 2;

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
    limits: Arc<ValidationLimits>,
    /// Validates uploads, [`PARALLEL_VALIDATIONS`] at a time.
    validators: Arc<LoaderPool>,
    /// Creates the sessions of polls and reloads; ends with the last clone.
    loader: Loader,
}

impl Registrar {
    pub fn new(registry: Arc<Registry>, runtime: Runtime) -> Self {
        let validators = Arc::new(LoaderPool::start(PARALLEL_VALIDATIONS));
        Self { registry, runtime, limits: Arc::default(), validators, loader: Loader::start() }
    }

    /// Bounds of upload validation (`admin.trial_timeout_ms`, `admin.extra_task_ops`).
    pub fn with_limits(mut self, limits: ValidationLimits) -> Self {
        self.limits = Arc::new(limits);
        self
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
        if let Some(v) = opts.version {
            check_version(v)?;
        }
        let reserving = Instant::now();
        let (version, exists) = self.reserve(name, opts).await?;
        let reserve = reserving.elapsed();
        // Validation runs without the mutation lock, on a thread of its own: a slow or hostile
        // upload (bounded by the trial run's time limit) never holds up other changes.
        let started = Instant::now();
        let outcome = {
            let (registry, runtime, limits, owned) = (self.registry.clone(), self.runtime.clone(), self.limits.clone(), name.to_string());
            self.validators
                .run(move || bundle::prepare(&registry, &runtime, &limits, &owned, version, &bundle).map(|(t, s)| (t, s, bundle)))
                .await
        };
        let validate = started.elapsed();
        let outcome = match outcome {
            Ok((task, staged, bundle)) => {
                let _guard = self.registry.mutation.lock().await;
                let (tasks_root, owned) = (self.tasks_root(), name.to_string());
                blocking(move || {
                    let stamp = publish(&tasks_root, &owned, version, &staged)?;
                    drop(bundle); // removes the staging directory, with the replaced version if any
                    Ok(stamp)
                })
                .await
                .map(|stamp| {
                    let manifest = Some(task.manifest.clone());
                    let entry = TaskEntry { name: name.into(), version, state: TaskState::Ready, manifest, task: Some(task) };
                    self.registry.insert(entry.clone(), stamp);
                    entry
                })
            }
            Err(e) => Err(e),
        };
        let entry = match outcome {
            Ok(entry) => entry,
            Err(e) => {
                if !exists {
                    self.registry.remove_loading(name, version);
                }
                tracing::info!(task = name, version, error = %e, "registration refused");
                return Err(e);
            }
        };
        let ms = |d: Duration| d.as_millis() as u64;
        let publish = started.elapsed() - validate;
        tracing::info!(
            task = name,
            version,
            replaced = exists,
            reserve_ms = ms(reserve),
            validate_ms = ms(validate),
            publish_ms = ms(publish),
            "task registered"
        );
        if opts.set_default {
            let _guard = self.registry.mutation.lock().await;
            self.pin(name, Some(version)).await?;
        }
        Ok(Registered { entry, validate })
    }

    /// Picks the version (under the mutation lock) and shows it as LOADING while it is validated,
    /// which also reserves its number against concurrent uploads. Returns it and whether it
    /// replaces an existing version.
    async fn reserve(&self, name: &str, opts: RegisterOptions) -> Result<(u32, bool), ServeError> {
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
        let version = match opts.version {
            Some(v) => v,
            None => next_version(name, highest)?,
        };
        let exists = known.contains(&version);
        if self.registry.is_loading(name, version) {
            return Err(ServeError::FailedPrecondition(format!(
                "task `{name}@{version}` is being registered by another upload; retry when it is READY or FAILED"
            )));
        }
        if exists && !opts.replace {
            return Err(ServeError::FailedPrecondition(format!(
                "task `{name}@{version}` already exists; set `replace` to swap it, or omit the version to get the next free one"
            )));
        }
        if !exists {
            let placeholder = TaskEntry { name: name.into(), version, state: TaskState::Loading, manifest: None, task: None };
            self.registry.insert(placeholder, None);
        }
        Ok((version, exists))
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
        if let Some(v) = all.iter().find(|v| version.is_none_or(|w| w == **v) && self.registry.is_loading(name, **v)) {
            return Err(ServeError::FailedPrecondition(format!("task `{name}@{v}` is being registered; retry when it is READY or FAILED")));
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
                    // The pin goes first: a crash in between leaves the version unpinned, never a
                    // pin naming a version that is gone (which a later upload of it would inherit).
                    if pinned == Some(v) || store::read_default(&task_dir) == Some(v) {
                        store::write_default(&task_dir, None).map_err(io_error)?;
                    }
                    if on_disk.contains(&v) {
                        store::retire(&task_dir.join(v.to_string()), &trash.path().join("version")).map_err(io_error)?;
                        store::crash_point("after-retire");
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
        let entries: Vec<TaskEntry> = self.registry.entries_named(name).into_iter().filter(|e| e.state != TaskState::Draining).collect();
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
                if self.registry.is_loading(name, *version) {
                    continue; // an upload of this process, being validated
                }
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
        let failed: Vec<u32> =
            self.registry.entries_named(name).into_iter().filter(|e| matches!(e.state, TaskState::Failed(_))).map(|e| e.version).collect();
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

/// Publishes a validated staged version as `tasks/<name>/<version>/` (under the mutation lock,
/// on a blocking thread); the stamp of the published directory.
fn publish(tasks_root: &Path, name: &str, version: u32, staged: &Path) -> Result<Option<Stamp>, ServeError> {
    let task_dir = tasks_root.join(name);
    let target = task_dir.join(version.to_string());
    // A pin naming a version that does not exist is stale (a crash of an older release left it):
    // cleared before publishing, so the new version does not inherit it.
    if !target.is_dir() && store::read_default(&task_dir) == Some(version) {
        tracing::warn!(task = name, version, "removing a stale DEFAULT pin that named a missing version");
        store::write_default(&task_dir, None).map_err(io_error)?;
    }
    store::crash_point("before-publish");
    let published = if target.is_dir() { store::publish_replace(staged, &target) } else { store::publish_new(staged, &target) };
    published.map_err(|e| {
        ServeError::FailedPrecondition(format!(
            "cannot publish `{name}@{version}` (another replica may have published it first; retry): {e}"
        ))
    })?;
    store::crash_point("after-publish");
    // Published either way; a missing record is restored by the unregister that needs it.
    if let Err(e) = store::raise_last_version(&task_dir, version) {
        tracing::warn!(task = name, version, error = %e, "cannot record the highest assigned version");
    }
    Ok(Stamp::of(&target))
}

/// A version a client gives: 1..=MAX_VERSION.
fn check_version(version: u32) -> Result<(), ServeError> {
    match version {
        0 => Err(ServeError::InvalidArgument("version must be a positive integer (omit it for the next free one)".into())),
        v if v > MAX_VERSION => Err(ServeError::InvalidArgument(format!(
            "version {v} is too large: versions go up to {MAX_VERSION} (omit it for the next free one)"
        ))),
        _ => Ok(()),
    }
}

/// The number after `highest`, or an error once numbers are used up (never wraps to 0).
fn next_version(name: &str, highest: u32) -> Result<u32, ServeError> {
    highest.checked_add(1).filter(|v| *v <= MAX_VERSION).ok_or_else(|| {
        ServeError::FailedPrecondition(format!(
            "task `{name}` has used version numbers up to {highest}, and automatic numbering stops at {MAX_VERSION}: \
             give a free version explicitly, or unregister every version of the task to start again at 1"
        ))
    })
}

fn versions_on_disk(task_dir: &Path) -> BTreeSet<u32> {
    let Ok(entries) = std::fs::read_dir(task_dir) else { return BTreeSet::new() };
    entries.flatten().filter(|e| e.path().is_dir()).filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok())).collect()
}

fn check_name(name: &str) -> Result<(), ServeError> {
    if valid_name(name) {
        Ok(())
    } else if name.ends_with(super::embedding::SUFFIX) && valid_name(name.trim_end_matches(super::embedding::SUFFIX)) {
        Err(ServeError::FailedPrecondition(format!(
            "`{}` is a backbone's built-in embedding task: it has no files to register, remove or pin",
            name.escape_debug()
        )))
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
