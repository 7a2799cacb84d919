//! Two server processes on one repository volume (replicas of one Deployment): each picks up tasks
//! registered, replaced, re-pinned or removed through the other within the poll interval.

mod admin_support;
mod common;

use std::time::{Duration, Instant};

use adapterdrop_serve::proto::SetDefaultVersionRequest;
use adapterdrop_serve::proto::inference_client::InferenceClient;
use admin_support::*;
use common::TestServer;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const POLL: &[(&str, &str)] = &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "1")];

/// Polls `f` until it holds; returns how long that took.
async fn within<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if f().await {
            return t0.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not seen within {limit:?}");
}

async fn default_version(c: &InferenceClient<Channel>, task: &str) -> Option<u32> {
    infer(&mut c.clone(), task, None).await.ok().map(|r| r.results[0].version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_pick_up_each_others_changes_within_the_poll_interval() {
    let repo = temp_repo(&["sent"]);
    let a = TestServer::start_on(repo.path(), POLL);
    let b = TestServer::start_on(repo.path(), POLL);
    let (mut admin_a, mut admin_b) = (admin(&a.admin_addr()).await, admin(&b.admin_addr()).await);
    let (ca, cb) = (inference(&a.addr).await, inference(&b.addr).await);
    // Bound: one poll interval, plus loading time and scheduling slack on a busy 2-core machine.
    let limit = Duration::from_secs(6);

    // Registered on A: served by B.
    register(&mut admin_a, header("shared", None, false, false), &source("sent")).await.unwrap();
    let t_add = within(limit, "B serves shared@1", || async { default_version(&cb, "shared").await == Some(1) }).await;
    let mut health_b = HealthClient::new(b.channel().await);
    assert_eq!(health_b.check(HealthCheckRequest { service: "shared".into() }).await.unwrap().into_inner().status, 1);

    // A new version pinned on B: A follows the pin only once it has loaded that version.
    register(&mut admin_b, header("shared", None, true, false), &source("topic")).await.unwrap();
    let t_pin = within(limit, "A serves shared@2 as default", || async { default_version(&ca, "shared").await == Some(2) }).await;
    admin_b.set_default_version(SetDefaultVersionRequest { name: "shared".into(), version: Some(1) }).await.unwrap();
    within(limit, "A follows the pin back to 1", || async { default_version(&ca, "shared").await == Some(1) }).await;

    // Replaced on A (same version number, new content): B reloads it.
    register(&mut admin_a, header("shared", Some(2), false, true), &source("sent")).await.unwrap();
    within(limit, "B reloads the replaced shared@2", || async {
        infer(&mut cb.clone(), "shared", Some(2)).await.is_ok_and(|r| r.results[0].sequences[0].scores.len() == 2)
    })
    .await;

    // Removed through B: A stops serving it.
    unregister(&mut admin_b, "shared", None).await.unwrap();
    let t_remove = within(limit, "A drops shared", || async {
        infer(&mut ca.clone(), "shared", None).await.is_err_and(|e| e.code() == tonic::Code::NotFound)
    })
    .await;
    // Untouched tasks were served throughout.
    infer(&mut ca.clone(), "sent", None).await.unwrap();
    infer(&mut cb.clone(), "sent", None).await.unwrap();
    println!("ADMIN-REPLICAS poll_interval_s=1: add seen after {t_add:?}, pin after {t_pin:?}, removal after {t_remove:?}");
}
