//! Servers run in process: `App` owns all of a server's state (metrics, statistics, loader,
//! graphs), so two servers in one process on `127.0.0.1:0` count their requests apart.

mod common;

use std::time::Duration;

use adapterdrop_serve::config::Settings;
use adapterdrop_serve::context::Context;
use adapterdrop_serve::kserve_proto::ModelStatisticsRequest;
use adapterdrop_serve::kserve_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use adapterdrop_serve::proto::inference_client::InferenceClient;
use adapterdrop_serve::proto::{InferRequest, TaskRef, Texts, infer_request::Inputs};
use adapterdrop_serve::runtime::Runtime;
use adapterdrop_serve::server::App;
use common::{ort_library, test_repo};
use tokio::sync::oneshot;

/// One server in this process: its address, its context, and how to stop it.
struct InProcess {
    addr: String,
    ctx: std::sync::Arc<Context>,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<adapterdrop_serve::server::Stopped>,
}

async fn start(runtime: Runtime) -> InProcess {
    let mut settings = Settings::default();
    settings.repository.path = test_repo();
    settings.repository.poll_interval_s = 0;
    settings.server.listen = "127.0.0.1:0".into();
    settings.metrics.listen = "127.0.0.1:0".into();
    settings.admin.listen = "127.0.0.1:0".into();
    settings.server.shutdown_grace_s = 5;
    let app = tokio::task::block_in_place(|| App::load_with(settings, runtime)).expect("load");
    let ctx = app.ctx.clone();
    let listener = app.bind().await.expect("bind");
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        app.serve(listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve")
    });
    InProcess { addr, ctx, stop, done }
}

fn request(task: &str) -> InferRequest {
    InferRequest {
        tasks: vec![TaskRef { name: task.into(), ..Default::default() }],
        inputs: Some(Inputs::Texts(Texts { texts: vec!["a good film".into(), "a dull one".into()] })),
        truncate: false,
        return_fusion_weights: false,
        id: String::new(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_in_one_process_keep_separate_metrics_and_statistics() {
    // ONNX Runtime allows one environment per process: both servers share it, nothing else.
    let runtime = tokio::task::block_in_place(|| {
        Runtime::init(&adapterdrop_serve::config::RuntimeSettings {
            library_path: Some(ort_library()),
            intra_threads: 1,
            ..Default::default()
        })
    })
    .expect("ONNX Runtime");
    let (a, b) = (start(runtime.clone()).await, start(runtime).await);
    assert_ne!(a.addr, b.addr);
    let mut ca = InferenceClient::connect(format!("http://{}", a.addr)).await.unwrap();
    let mut cb = InferenceClient::connect(format!("http://{}", b.addr)).await.unwrap();
    for _ in 0..3 {
        ca.infer(request("sent")).await.expect("infer on A");
    }
    cb.infer(request("sent")).await.expect("infer on B");
    assert_eq!(cb.infer(request("no-such-task")).await.unwrap_err().code(), tonic::Code::NotFound);

    // Prometheus counters, per server.
    let ok = |ctx: &Context| ctx.metrics.requests.with_label_values(&["native", "sent", "OK"]).get();
    let not_found =
        |ctx: &Context| ctx.metrics.requests.with_label_values(&["native", adapterdrop_serve::metrics::UNKNOWN_TASK, "NotFound"]).get();
    assert_eq!((ok(&a.ctx), not_found(&a.ctx)), (3, 0), "server A counts only its own requests");
    assert_eq!((ok(&b.ctx), not_found(&b.ctx)), (1, 1), "server B counts only its own requests");
    assert_eq!(a.ctx.metrics.batch_rows.get_sample_sum(), 6.0, "2 rows per request on A");
    assert_eq!(b.ctx.metrics.batch_rows.get_sample_sum(), 2.0);

    // KServe ModelStatistics, per server, through each server's own port.
    for (addr, expected) in [(&a.addr, 3), (&b.addr, 1)] {
        let mut k = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await.unwrap();
        let stats = k.model_statistics(ModelStatisticsRequest { name: "sent".into(), version: String::new() }).await.unwrap().into_inner();
        let s = stats.model_stats[0].inference_stats.unwrap();
        assert_eq!((s.success.unwrap().count, stats.model_stats[0].inference_count), (expected, 2 * expected), "{addr}");
    }

    // Stopping one leaves the other serving.
    let _ = a.stop.send(());
    tokio::time::timeout(Duration::from_secs(10), a.done).await.expect("A stops").unwrap();
    cb.infer(request("sent")).await.expect("B still serves");
    assert_eq!(ok(&b.ctx), 2);
    let _ = b.stop.send(());
    tokio::time::timeout(Duration::from_secs(10), b.done).await.expect("B stops").unwrap();
}
