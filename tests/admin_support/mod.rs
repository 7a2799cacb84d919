//! Helpers of the admin integration tests: private repositories, bundles, admin and inference calls.
#![allow(dead_code)]

pub mod graphs;

use std::path::{Path, PathBuf};

use adapterdrop_serve::proto::admin_client::AdminClient;
use adapterdrop_serve::proto::drop_config::Mode;
use adapterdrop_serve::proto::inference_client::InferenceClient;
use adapterdrop_serve::proto::register_task_request::Part;
use adapterdrop_serve::proto::{
    AdapterHubTask, BundleChunk, BundleHeader, DropConfig, InferRequest, InferResponse, ListTasksRequest, RegisterTaskRequest,
    RegisterTaskResponse, RobustRange, TaskInfo, TaskRef, Texts, UnregisterTaskRequest, UnregisterTaskResponse, infer_request::Inputs,
};
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::common::test_repo;

pub use crate::common::copy_dir;

/// A private repository with the small `bert-tiny` backbone and the given test-repo tasks.
pub fn temp_repo(tasks: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&test_repo().join("backbones/bert-tiny"), &dir.path().join("backbones/bert-tiny"));
    std::fs::create_dir_all(dir.path().join("tasks")).unwrap();
    for t in tasks {
        copy_dir(&test_repo().join("tasks").join(t), &dir.path().join("tasks").join(t));
    }
    dir
}

/// A copy of a test-repo task version directory, to modify into a bad bundle.
pub fn bundle_copy(task: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&test_repo().join("tasks").join(task).join("1"), dir.path());
    dir
}

/// The test repository's version-1 directory of `task`.
pub fn source(task: &str) -> PathBuf {
    test_repo().join("tasks").join(task).join("1")
}

pub fn header(name: &str, version: Option<u32>, set_default: bool, replace: bool) -> BundleHeader {
    BundleHeader { name: name.into(), version, set_default, replace, adapterhub: None }
}

pub fn robust(default: u32, min: u32, max: u32) -> Option<DropConfig> {
    Some(DropConfig { mode: Some(Mode::Robust(RobustRange { default, min, max })) })
}

/// The header of a weights-only registration (an AdapterHub directory) on `backbone`.
pub fn weights_header(name: &str, backbone: &str, drop: Option<DropConfig>) -> BundleHeader {
    let meta = AdapterHubTask { backbone: backbone.into(), drop, ..Default::default() };
    BundleHeader { adapterhub: Some(meta), ..header(name, None, false, false) }
}

/// Header, then every file of `dir` in chunks of at most `chunk` bytes.
pub fn messages(h: BundleHeader, dir: &Path, chunk: usize) -> Vec<RegisterTaskRequest> {
    let mut out = vec![RegisterTaskRequest { part: Some(Part::Header(h)) }];
    let mut files = Vec::new();
    walk(dir, "", &mut files);
    for rel in files {
        let data = std::fs::read(dir.join(&rel)).unwrap();
        for piece in data.chunks(chunk.max(1)) {
            out.push(chunk_msg(&rel, piece));
        }
    }
    out
}

pub fn chunk_msg(path: &str, data: &[u8]) -> RegisterTaskRequest {
    RegisterTaskRequest { part: Some(Part::Chunk(BundleChunk { path: path.into(), data: data.to_vec() })) }
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let rel = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.path().is_dir() { walk(&e.path(), &format!("{rel}/"), out) } else { out.push(rel) }
    }
}

pub fn with_token<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

pub async fn admin(addr: &str) -> AdminClient<Channel> {
    AdminClient::connect(format!("http://{addr}")).await.expect("connect admin").max_decoding_message_size(64 << 20)
}

pub async fn inference(addr: &str) -> InferenceClient<Channel> {
    InferenceClient::connect(format!("http://{addr}")).await.expect("connect").max_decoding_message_size(64 << 20)
}

pub async fn register_msgs(
    c: &mut AdminClient<Channel>,
    msgs: Vec<RegisterTaskRequest>,
    token: Option<&str>,
) -> Result<RegisterTaskResponse, Status> {
    c.register_task(with_token(tokio_stream::iter(msgs), token)).await.map(|r| r.into_inner())
}

pub async fn register(c: &mut AdminClient<Channel>, h: BundleHeader, dir: &Path) -> Result<RegisterTaskResponse, Status> {
    register_msgs(c, messages(h, dir, 16 << 10), None).await
}

pub async fn unregister(c: &mut AdminClient<Channel>, name: &str, version: Option<u32>) -> Result<UnregisterTaskResponse, Status> {
    let req = UnregisterTaskRequest { name: name.into(), version, all_versions: version.is_none() };
    c.unregister_task(req).await.map(|r| r.into_inner())
}

pub async fn list(c: &mut AdminClient<Channel>) -> Vec<TaskInfo> {
    c.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks
}

pub fn infer_req(task: &str, version: Option<u32>, drop_first: Option<u32>, texts: &[&str]) -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: task.into(), version, drop_first, ..Default::default() }],
        inputs: Some(Inputs::Texts(Texts { texts: texts.iter().map(|t| t.to_string()).collect() })),
        truncate: false,
        id: String::new(),
        return_fusion_weights: false,
        ..Default::default()
    }
}

pub async fn infer(c: &mut InferenceClient<Channel>, task: &str, version: Option<u32>) -> Result<InferResponse, Status> {
    c.infer(infer_req(task, version, None, &["a fine film", "dull"])).await.map(|r| r.into_inner())
}

/// Hidden staging directories left under `tasks/`.
pub fn staging_dirs(repo: &Path) -> Vec<String> {
    std::fs::read_dir(repo.join("tasks"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".staging-"))
        .collect()
}

/// Names of `tasks/` entries (task directories and anything else), sorted.
pub fn task_dir_listing(repo: &Path) -> Vec<String> {
    let mut out: Vec<String> = walk_all(&repo.join("tasks"));
    out.sort();
    out
}

fn walk_all(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        out.push(e.path().display().to_string());
        if e.path().is_dir() {
            out.extend(walk_all(&e.path()));
        }
    }
    out
}

/// Rewrites the JSON file at `path` (a bundle's `task.json`, an adapter's config) through `edit`.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// [`edit_json`] on the `task.json` of the bundle in `dir`.
pub fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    edit_json(&dir.join("task.json"), edit);
}

/// A server's state loaded in this process on `repo` (no ports), and a registrar over it.
pub fn in_process_app(repo: &Path) -> (adapterdrop_serve::server::App, adapterdrop_serve::repository::Registrar) {
    let mut settings = adapterdrop_serve::config::Settings::default();
    settings.repository.path = repo.to_path_buf();
    settings.runtime.library_path = Some(crate::common::ort_library());
    settings.runtime.intra_threads = 1;
    let app = tokio::task::block_in_place(|| adapterdrop_serve::server::App::load(settings)).unwrap();
    let registrar = adapterdrop_serve::repository::Registrar::new(app.registry.clone(), app.runtime.clone());
    (app, registrar)
}
