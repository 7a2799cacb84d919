//! `ListTasks` / `GetTask` answers, shared by the Inference and Admin services.

use crate::api::convert;
use crate::error::ServeError;
use crate::proto::TaskInfo;
use crate::repository::{Registry, TaskEntry};

fn info(registry: &Registry, entry: &TaskEntry) -> TaskInfo {
    let mut info = convert::task_info(entry, registry.default_version(&entry.name) == Some(entry.version));
    info.default_pinned = registry.pinned_version(&entry.name).is_some();
    info
}

/// Every task version the server knows, including failed, loading and draining ones.
pub fn list(registry: &Registry) -> Vec<TaskInfo> {
    registry.entries().iter().map(|e| info(registry, e)).collect()
}

/// One version; without a version, the default (or the highest known if none is ready).
pub fn get(registry: &Registry, name: &str, version: Option<u32>) -> Result<TaskInfo, ServeError> {
    let default = registry.default_version(name);
    let entries = registry.entries_named(name);
    if entries.is_empty() {
        return Err(ServeError::NotFound(format!("task `{name}` not found")));
    }
    let wanted = version.or(default).or_else(|| entries.iter().map(|e| e.version).max());
    let entry = entries
        .iter()
        .find(|e| Some(e.version) == wanted)
        .ok_or_else(|| ServeError::NotFound(format!("task `{name}` has no version {}", version.unwrap_or_default())))?;
    Ok(info(registry, entry))
}
