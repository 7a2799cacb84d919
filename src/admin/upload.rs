//! Receiving a client-streamed task bundle into a staging directory, with size and path limits.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::Streaming;

use crate::config::AdminSettings;
use crate::error::ServeError;
use crate::proto::{BundleHeader, RegisterTaskRequest, register_task_request::Part};
use crate::repository::Bundle;
use crate::repository::manifest::{MAX_MANIFEST_BYTES, valid_name};

/// Most files one bundle may hold (task.json, one graph per slot, the head).
pub const MAX_FILES: usize = 256;
/// Deepest relative path accepted (`slots/layer0_ffn.onnx` is 2).
pub const MAX_DEPTH: usize = 4;

pub struct Received {
    pub header: BundleHeader,
    pub bundle: Bundle,
    pub bytes: u64,
    pub files: usize,
}

/// Bounds of one upload (`admin.*`).
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    pub max_bytes: u64,
    /// Longest wait for the next message.
    pub idle: Duration,
    /// Longest time the whole upload may take.
    pub total: Duration,
}

impl UploadLimits {
    pub fn from_settings(admin: &AdminSettings) -> Self {
        Self { max_bytes: admin.max_bundle_bytes, idle: admin.upload_idle_timeout(), total: admin.upload_timeout() }
    }
}

/// Reads the header and every chunk. On any error, a stalled client included (`limits.idle`,
/// `limits.total`), the staging directory is removed.
pub async fn receive(stream: &mut Streaming<RegisterTaskRequest>, tasks_root: &Path, limits: UploadLimits) -> Result<Received, ServeError> {
    let deadline = Instant::now() + limits.total;
    let max_bytes = limits.max_bytes;
    let header = match next_within(stream, limits, deadline).await? {
        Some(Part::Header(h)) => h,
        Some(Part::Chunk(_)) => return Err(ServeError::InvalidArgument("the first message must be a `header`, not a `chunk`".into())),
        None => return Err(ServeError::InvalidArgument("empty upload: send a `header`, then the bundle's files as `chunk`s".into())),
    };
    if !valid_name(&header.name) {
        return Err(ServeError::InvalidArgument(format!(
            "task name `{}` is not valid: use 1-64 characters [A-Za-z0-9_.-], starting with a letter or digit, without `..` or `/`",
            header.name.escape_debug()
        )));
    }
    let bundle = tokio::task::block_in_place(|| Bundle::create(tasks_root)).map_err(io_error)?;
    let mut seen = std::collections::BTreeSet::new();
    let mut current: Option<(String, File)> = None;
    let (mut bytes, mut file_bytes) = (0u64, 0u64);
    while let Some(part) = next_within(stream, limits, deadline).await? {
        let chunk = match part {
            Part::Chunk(c) => c,
            Part::Header(_) => return Err(ServeError::InvalidArgument("a second `header` arrived; send exactly one, first".into())),
        };
        bytes += chunk.data.len() as u64;
        if bytes > max_bytes {
            return Err(ServeError::InvalidArgument(format!(
                "{}: the bundle exceeds the limit of {max_bytes} bytes (admin.max_bundle_bytes)",
                chunk.path
            )));
        }
        if current.as_ref().map(|(p, _)| p.as_str()) != Some(chunk.path.as_str()) {
            check_path(&chunk.path)?;
            if !seen.insert(chunk.path.clone()) {
                return Err(ServeError::InvalidArgument(format!("{}: sent twice; a file's chunks must be contiguous", chunk.path)));
            }
            if seen.len() > MAX_FILES {
                return Err(ServeError::InvalidArgument(format!("{}: more than {MAX_FILES} files in one bundle", chunk.path)));
            }
            let target = bundle.dir().join(&chunk.path);
            let file = tokio::task::block_in_place(|| {
                std::fs::create_dir_all(target.parent().expect("inside the bundle"))?;
                File::create_new(&target)
            })
            .map_err(|e| ServeError::InvalidArgument(format!("{}: cannot be created in the bundle: {e}", chunk.path)))?;
            current = Some((chunk.path.clone(), file));
            file_bytes = 0;
        }
        file_bytes += chunk.data.len() as u64;
        if chunk.path == "task.json" && file_bytes > MAX_MANIFEST_BYTES {
            return Err(ServeError::InvalidArgument(format!("task.json: more than the {MAX_MANIFEST_BYTES} bytes a manifest may have")));
        }
        let (_, file) = current.as_mut().expect("set above");
        tokio::task::block_in_place(|| file.write_all(&chunk.data)).map_err(io_error)?;
    }
    Ok(Received { header, bundle, bytes, files: seen.len() })
}

/// The next part, unless the client stalls past `limits.idle` or the upload past `deadline`.
async fn next_within(
    stream: &mut Streaming<RegisterTaskRequest>,
    limits: UploadLimits,
    deadline: Instant,
) -> Result<Option<Part>, ServeError> {
    let idle_end = Instant::now() + limits.idle;
    match tokio::time::timeout_at(idle_end.min(deadline).into(), next(stream)).await {
        Ok(part) => part,
        Err(_) if idle_end <= deadline => Err(ServeError::DeadlineExceeded(format!(
            "upload stalled: nothing received for {} s (admin.upload_idle_timeout_s); the partial bundle was discarded",
            limits.idle.as_secs()
        ))),
        Err(_) => Err(ServeError::DeadlineExceeded(format!(
            "upload took longer than {} s (admin.upload_timeout_s); the partial bundle was discarded",
            limits.total.as_secs()
        ))),
    }
}

async fn next(stream: &mut Streaming<RegisterTaskRequest>) -> Result<Option<Part>, ServeError> {
    match stream.next().await {
        None => Ok(None),
        Some(Err(status)) => Err(ServeError::InvalidArgument(format!("upload stream failed: {}", status.message()))),
        Some(Ok(msg)) => match msg.part {
            Some(p) => Ok(Some(p)),
            None => Err(ServeError::InvalidArgument("a message with neither `header` nor `chunk`".into())),
        },
    }
}

/// Relative, '/'-separated, each component a safe name: no absolute paths, `..`, hidden files.
fn check_path(path: &str) -> Result<(), ServeError> {
    let parts: Vec<&str> = path.split('/').collect();
    if path.is_empty() || path.len() > 255 || parts.len() > MAX_DEPTH || !parts.iter().all(|p| valid_name(p)) {
        return Err(ServeError::InvalidArgument(format!(
            "file path `{}` is not allowed: use a relative path of at most {MAX_DEPTH} '/'-separated names [A-Za-z0-9_.-] \
             (no `..`, no leading `/` or `.`)",
            path.escape_debug()
        )));
    }
    Ok(())
}

fn io_error(e: std::io::Error) -> ServeError {
    ServeError::Repository(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_paths_stay_inside() {
        for ok in ["task.json", "head.onnx", "slots/layer0_ffn.onnx"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "slots/../../x", "a//b", ".hidden", "slots/.x", "a\\b", "a/b/c/d/e"] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }
}
