//! The Prometheus endpoint reflects real traffic, and every response carries a request id that
//! also appears in the server's logs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use adapterdrop_serve::proto::{InferRequest, TaskRef, Texts, infer_request::Inputs};
use common::TestServer;
use tonic::Request;

/// A plain HTTP/1.1 GET; returns (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics port");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    (head.lines().next().unwrap_or_default().to_string(), body.to_string())
}

/// The value of the first sample whose line starts with `prefix` (name plus labels).
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

fn request(tasks: &[&str], texts: &[&str]) -> InferRequest {
    InferRequest {
        tasks: tasks.iter().map(|t| TaskRef { name: t.to_string(), ..Default::default() }).collect(),
        inputs: Some(Inputs::Texts(Texts { texts: texts.iter().map(|s| s.to_string()).collect() })),
        truncate: false,
        id: String::new(),
        return_fusion_weights: false,
        ..Default::default()
    }
}

#[tokio::test]
async fn metrics_count_requests_batches_errors_and_shared_rows() {
    let server = TestServer::start(&[]);
    assert!(!server.metrics_addr.is_empty(), "server did not log its metrics address");
    let mut c = server.client().await;
    // A two-task fan-out on one backbone: `sent` and `topic` both drop layer 0, so its rows are shared.
    for _ in 0..3 {
        c.infer(request(&["sent", "topic"], &["a good film", "a dull one"])).await.expect("fan-out");
    }
    let err = c.infer(request(&["no-such-task"], &["x"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let (status, text) = http_get(&server.metrics_addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert_eq!(sample(&text, r#"adapterdrop_requests_total{api="native",code="OK",task="sent"}"#), Some(3.0), "{text}");
    assert_eq!(sample(&text, r#"adapterdrop_requests_total{api="native",code="OK",task="topic"}"#), Some(3.0));
    assert_eq!(sample(&text, r#"adapterdrop_requests_total{api="native",code="NotFound",task="unknown"}"#), Some(1.0));
    assert!(!text.contains("no-such-task"), "a name the server does not serve became a label");
    assert_eq!(sample(&text, r#"adapterdrop_errors_total{api="native",type="not_found"}"#), Some(1.0));
    assert_eq!(sample(&text, r#"adapterdrop_request_duration_seconds_count{api="native"}"#), Some(4.0));
    let batches = sample(&text, "adapterdrop_batches_total").unwrap();
    assert!((1.0..=3.0).contains(&batches), "{batches} batches for 3 requests");
    assert_eq!(sample(&text, "adapterdrop_batch_rows_sum"), Some(6.0), "2 rows per request");
    assert_eq!(sample(&text, "adapterdrop_queue_duration_seconds_count"), Some(3.0));
    assert!(sample(&text, "adapterdrop_compute_duration_seconds_sum").unwrap() > 0.0);
    // Two lanes over the same 2 inputs: every layer before the first adapter runs once, not twice.
    assert!(sample(&text, "adapterdrop_trunk_rows_saved_total").unwrap() > 0.0, "{text}");
    assert!(sample(&text, "adapterdrop_layer_rows_total").unwrap() > 0.0);
    assert_eq!(sample(&text, "adapterdrop_queue_depth"), Some(0.0));
    assert_eq!(sample(&text, r#"adapterdrop_tasks_loaded{state="ready",task="sent",version="1"}"#), Some(1.0));
    assert!(text.contains("# TYPE adapterdrop_request_duration_seconds histogram"));

    let (status, _) = http_get(&server.metrics_addr, "/nope");
    assert!(status.contains("404"), "{status}");
}

#[tokio::test]
async fn request_ids_are_returned_and_logged() {
    let server = TestServer::start(&[]);
    let mut c = server.client().await;

    let mut req = Request::new(request(&["no-such-task"], &["x"]));
    req.metadata_mut().insert("x-request-id", "client-chosen-42".parse().unwrap());
    let status = c.infer(req).await.unwrap_err();
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "client-chosen-42", "errors carry the id too");

    let ok = c.infer(request(&["sent"], &["fine"])).await.expect("infer");
    let generated = ok.metadata().get("x-request-id").expect("a generated id").to_str().unwrap().to_string();
    assert!(!generated.is_empty());
    let again = c.infer(request(&["sent"], &["fine"])).await.expect("infer");
    assert_ne!(again.metadata().get("x-request-id").unwrap().to_str().unwrap(), generated, "ids are unique");

    // An id a log line could not hold safely is replaced.
    let mut req = Request::new(request(&["sent"], &["fine"]));
    req.metadata_mut().insert("x-request-id", "has space".parse().unwrap());
    let resp = c.infer(req).await.expect("infer");
    assert_ne!(resp.metadata().get("x-request-id").unwrap(), "has space");

    std::thread::sleep(std::time::Duration::from_millis(200));
    let logs = server.drain_logs().join("\n");
    assert!(logs.contains("client-chosen-42"), "the rejected request's log line names its id:\n{logs}");
}

#[tokio::test]
async fn the_admin_port_returns_and_logs_request_ids_too() {
    use adapterdrop_serve::proto::{UnregisterTaskRequest, admin_client::AdminClient};
    let server = TestServer::start(&[]);
    let mut admin = AdminClient::connect(format!("http://{}", server.admin_addr())).await.expect("admin port");

    let mut req = Request::new(UnregisterTaskRequest { name: "no-such-task".into(), version: None, all_versions: true });
    req.metadata_mut().insert("x-request-id", "admin-op-7".parse().unwrap());
    let status = admin.unregister_task(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "admin-op-7");

    let listed = admin.list_tasks(adapterdrop_serve::proto::ListTasksRequest {}).await.expect("list");
    assert!(!listed.metadata().get("x-request-id").expect("a generated id").is_empty());

    std::thread::sleep(std::time::Duration::from_millis(200));
    let logs = server.drain_logs().join("\n");
    assert!(logs.contains("admin-op-7"), "the refused admin call's log line names its id:\n{logs}");
}

/// Client strings in log lines are cut as error messages cut them: a request naming 1,000 tasks of
/// 200 bytes (200 KB) and a KServe model name of 100 KB each log one short line, with the count.
#[tokio::test]
async fn log_lines_show_a_bounded_number_of_cut_client_names() {
    let server = TestServer::start(&[]);
    let mut c = server.client().await;
    let names: Vec<String> = (0..1000).map(|i| format!("{i:04}{}", "n".repeat(196))).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut req = request(&refs, &["x"]);
    req.id = "i".repeat(50_000);
    let status = c.infer(req).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let mut k = adapterdrop_serve::kserve_proto::grpc_inference_service_client::GrpcInferenceServiceClient::new(server.channel().await);
    let model = "m".repeat(100_000);
    let status =
        k.model_infer(adapterdrop_serve::kserve_proto::ModelInferRequest { model_name: model, ..Default::default() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let logs = server.drain_logs();
    let line = |what: &str| logs.iter().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no `{what}` line:\n{}", logs.join("\n")));
    let native = line("infer rejected");
    println!("native line: {} bytes; KServe line: {} bytes", native.len(), line("model_infer rejected").len());
    assert!(native.len() < 4096, "a {}-byte log line: {}…", native.len(), &native[..300]);
    assert!(native.contains("task_count=1000") && native.contains("(+992 more)"), "{native}");
    assert!(native.contains("0000nnn") && !native.contains("0008nnn"), "the first 8 names, cut: {native}");
    let kserve = line("model_infer rejected");
    assert!(kserve.len() < 4096, "a {}-byte log line: {}…", kserve.len(), &kserve[..300]);
    assert!(kserve.contains("(100000 bytes)"), "{kserve}");
    // The queue depth gauge says what it counts.
    let (_, metrics) = http_get(&server.metrics_addr, "/metrics");
    let help = metrics.lines().find(|l| l.starts_with("# HELP adapterdrop_queue_depth")).expect("queue_depth help");
    assert!(help.contains("admitted") && help.contains("tokenized"), "{help}");
}
