//! Many tasks per replica (issue 12): a registration costs the same however many tasks are
//! loaded (counted as walks over every task, not timed), and the adapter banks growing under a
//! stream of registrations fail no request and disturb no row already in them.

mod admin_support;
mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use adapterdrop_serve::proto::{AdapterHubTask, InferResponse};
use adapterdrop_serve::repository::adapterhub::safetensors;
use adapterdrop_serve::repository::{Bundle, RegisterOptions};
use admin_support::*;
use common::TestServer;

/// `save_adapter`'s files of the `sent` adapter, its up-projection biases changed by `shift`
/// (not uniformly, which the LayerNorm after the adapter would cancel): every `shift` gives a
/// distinct task with the same shapes.
fn adapter_dir(shift: f32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&source("sent").join("adapterhub"), dir.path());
    let path = dir.path().join("adapter.safetensors");
    let mut tensors = safetensors::parse(&std::fs::read(&path).unwrap()).unwrap();
    for (key, t) in tensors.iter_mut() {
        if key.ends_with("adapter_up.bias") {
            t.data.iter_mut().enumerate().for_each(|(j, v)| *v += shift * ((j % 5) as f32 - 2.0));
        }
    }
    std::fs::write(&path, safetensors::serialize(&tensors)).unwrap();
    dir
}

fn meta() -> AdapterHubTask {
    AdapterHubTask { backbone: "bert-tiny".into(), drop: robust(0, 0, 2), ..Default::default() }
}

/// A weights-only version directory as the admin service stages it (`weights_only::prepare`).
fn weights_only_bundle(registrar: &adapterdrop_serve::repository::Registrar, shift: f32) -> Bundle {
    let bundle = Bundle::copy_of(&registrar.tasks_root(), adapter_dir(shift).path()).unwrap();
    adapterdrop_serve::admin::weights_only::prepare(bundle.dir(), &meta(), registrar.registry()).unwrap();
    bundle
}

/// Copies a registered version `tasks/<from>/1` to `tasks/<to>/1`, renamed.
fn clone_version(repo: &Path, from: &str, to: &str) {
    let dir = repo.join("tasks").join(to).join("1");
    copy_dir(&repo.join("tasks").join(from).join("1"), &dir);
    edit_manifest(&dir, |m| m["name"] = to.into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_among_many_tasks_walks_none_of_them() {
    const TASKS: usize = 300;
    let repo = temp_repo(&[]);
    let (app, registrar) = in_process_app(repo.path());
    let registry = app.registry.clone();
    registrar.register("t0", weights_only_bundle(&registrar, 0.0), RegisterOptions::default()).await.unwrap();
    for i in 1..TASKS {
        clone_version(repo.path(), "t0", &format!("t{i}"));
    }
    assert_eq!(registrar.reconcile().await.unwrap(), TASKS - 1, "a poll picks up the copies");
    let (mut health, _service) = tonic_health::server::health_reporter();
    let mut known = Default::default();
    // The first sync reads every name; after that only the names reported as changed.
    adapterdrop_serve::api::health::sync(&registry, &mut health, &mut known).await;
    assert_eq!(known.len(), TASKS + 1, "every task and the built-in embedding task");
    assert_eq!(registry.take_touched(), Some(BTreeSet::new()));

    // What one RegisterTask does: reserve, validate, publish, pin, report health, answer.
    let walks = registry.table_walks();
    let opts = RegisterOptions { set_default: true, ..Default::default() };
    let done = registrar.register("new", weights_only_bundle(&registrar, 0.5), opts).await.unwrap();
    adapterdrop_serve::api::health::report(&mut health, &registry, "new").await;
    adapterdrop_serve::api::tasks::get(&registry, "new", Some(done.entry.version)).unwrap();
    adapterdrop_serve::api::health::sync(&registry, &mut health, &mut known).await;
    assert_eq!(known.get("new"), Some(&true), "the follower saw the new name");
    // And a removal and a pin.
    registrar.unregister("t7", None).await.unwrap();
    registrar.set_default("t8", Some(1)).await.unwrap();
    adapterdrop_serve::api::health::sync(&registry, &mut health, &mut known).await;
    assert_eq!(registry.table_walks(), walks, "a registration, removal or pin walked every task");
    assert_eq!((known.get("t7"), known.get("t8")), (None, Some(&true)));
    assert_eq!(known.len(), TASKS + 1);
    assert_eq!(registry.take_touched(), Some(BTreeSet::new()), "every change was taken by a sync");
}

fn logits(r: &InferResponse) -> Vec<Vec<f32>> {
    r.results[0].sequences.iter().map(|s| s.logits.clone()).collect()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn banks_growing_under_traffic_fail_no_request_and_keep_every_row() {
    // 40 registrations grow the banks from 8 rows through 10, 13, 17, 22, 28, 35 and 44, each
    // step a copy of every row into new tensors while three clients infer on a bank task.
    const NEW: usize = 40;
    let repo = temp_repo(&["sent"]);
    let server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")]);
    let mut a = admin(&server.admin_addr()).await;
    let mut c = inference(&server.addr).await;
    let before = logits(&infer(&mut c, "sent", None).await.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (addr, stop, want) = (server.addr.clone(), stop.clone(), before.clone());
            tokio::spawn(async move {
                let mut c = inference(&addr).await;
                let (mut served, mut failures) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match infer(&mut c, "sent", None).await {
                        Ok(r) if max_diff(&logits(&r), &want) <= 1e-5 => served += 1,
                        Ok(r) => failures.push(format!("changed logits {:?} != {want:?}", logits(&r))),
                        Err(e) => failures.push(format!("{:?}: {}", e.code(), e.message())),
                    }
                }
                (served, failures)
            })
        })
        .collect();
    let mut first = Vec::new();
    for i in 0..NEW {
        let dir = adapter_dir(0.01 * (i + 1) as f32);
        let h = weights_header(&format!("g{i}"), "bert-tiny", robust(0, 0, 2));
        register(&mut a, h, dir.path()).await.unwrap_or_else(|e| panic!("g{i}: {e:?}"));
        first.push(logits(&infer(&mut c, &format!("g{i}"), None).await.unwrap()));
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let (served, failures) = client.await.unwrap();
        assert!(failures.is_empty(), "requests failed or changed while the banks grew: {failures:?}");
        assert!(served > 0, "a client was served");
    }
    // Every task's rows moved with each growth and still hold its own weights.
    for (i, want) in first.iter().enumerate() {
        let now = logits(&infer(&mut c, &format!("g{i}"), None).await.unwrap());
        assert!(max_diff(&now, want) <= 1e-5, "g{i} after growth: {now:?} != {want:?}");
        if i > 0 {
            assert!(max_diff(want, &first[i - 1]) > 1e-4, "g{i} and g{} are distinct tasks", i - 1);
        }
    }
}
