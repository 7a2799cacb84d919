//! KServe v2 endpoint over gRPC with the tonic client: bad tensors get precise INVALID_ARGUMENT
//! statuses, failed task versions show in the repository index, and the server stays up.

mod common;

use adapterdrop_serve::kserve_proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use adapterdrop_serve::kserve_proto::model_infer_request::InferInputTensor;
use adapterdrop_serve::kserve_proto::{
    InferTensorContents, ModelInferRequest, ModelReadyRequest, ModelStatisticsRequest, RepositoryIndexRequest, RepositoryModelLoadRequest,
};
use common::{TestServer, copy_dir, test_repo};
use tonic::Code;
use tonic::transport::Channel;

async fn client(server: &TestServer) -> GrpcInferenceServiceClient<Channel> {
    GrpcInferenceServiceClient::new(server.channel().await)
}

fn bytes_elems(items: &[&str]) -> Vec<u8> {
    items.iter().flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.bytes())).collect()
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> InferInputTensor {
    InferInputTensor { name: name.into(), datatype: datatype.into(), shape: shape.to_vec(), ..Default::default() }
}

fn request(model: &str, inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> ModelInferRequest {
    ModelInferRequest { model_name: model.into(), inputs, raw_input_contents: raw, ..Default::default() }
}

fn ids_raw(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[tokio::test]
async fn malformed_tensors_get_invalid_argument_and_the_server_keeps_serving() {
    let server = TestServer::start(&[]);
    let mut c = client(&server).await;
    let mut typed = tensor("TEXT", "BYTES", &[1]);
    typed.contents = Some(InferTensorContents { bytes_contents: vec![b"typed".to_vec()], ..Default::default() });
    let cases: Vec<(&str, ModelInferRequest, &str)> = vec![
        (
            "raw length vs shape",
            request("sent", vec![tensor("input_ids", "INT64", &[1, 3])], vec![ids_raw(&[101, 102])]),
            "shape [1, 3] holds 3 INT64 elements (24 bytes) but its raw contents have 16 bytes",
        ),
        (
            "wrong datatype",
            request("sent", vec![tensor("TEXT", "FP32", &[1])], vec![vec![0; 4]]),
            "input `TEXT` has datatype FP32; it must be BYTES",
        ),
        ("missing input", request("sent", vec![], vec![]), "missing input"),
        (
            "extra input",
            request(
                "sent",
                vec![tensor("TEXT", "BYTES", &[1]), tensor("IMAGE", "BYTES", &[1])],
                vec![bytes_elems(&["a"]), bytes_elems(&["b"])],
            ),
            "unknown input `IMAGE`",
        ),
        (
            "raw and typed mixed",
            request(
                "sent",
                vec![tensor("TEXT", "BYTES", &[1]), {
                    let mut t = typed.clone();
                    t.name = "TEXT_PAIR".into();
                    t
                }],
                vec![bytes_elems(&["a"]), vec![]],
            ),
            "has typed contents while raw_input_contents is used",
        ),
        (
            "element count",
            request("sent", vec![tensor("TEXT", "BYTES", &[2, 1])], vec![bytes_elems(&["only one"])]),
            "shape [2, 1] holds 2 elements but its raw contents encode 1",
        ),
        (
            "router validation",
            request("sent", vec![tensor("input_ids", "INT64", &[1, 3])], vec![ids_raw(&[101, 99999, 102])]),
            "outside the vocabulary",
        ),
    ];
    for (what, req, needle) in cases {
        let status = c.model_infer(req).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {}", status.message());
        assert!(status.message().contains(needle), "{what}: `{}` lacks `{needle}`", status.message());
    }
    let unknown = c.model_infer(request("nope", vec![typed.clone()], vec![])).await.expect_err("unknown model");
    assert_eq!(unknown.code(), Code::NotFound);
    // Still serving: typed contents work, answers come in raw_output_contents.
    let ok = c.model_infer(request("sent", vec![typed], vec![])).await.expect("typed text").into_inner();
    assert_eq!(ok.outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["logits", "probabilities", "label"]);
    assert_eq!(ok.raw_output_contents[0].len(), 2 * 4);
    let stats = c.model_statistics(ModelStatisticsRequest { name: "sent".into(), version: String::new() }).await.unwrap().into_inner();
    let s = stats.model_stats[0].inference_stats.unwrap();
    assert_eq!(s.success.unwrap().count, 1);
    // Only the refusal after the task resolved (the router's vocabulary check) is a task failure.
    assert_eq!(s.fail.unwrap().count, 1);
}

#[tokio::test]
async fn failed_versions_are_unavailable_in_the_index_and_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    copy_dir(&test_repo().join("backbones/bert-tiny"), &repo.join("backbones/bert-tiny"));
    for t in ["sent", "topic"] {
        copy_dir(&test_repo().join("tasks").join(t), &repo.join("tasks").join(t));
    }
    std::fs::remove_file(repo.join("tasks/topic/1/head.onnx")).unwrap();
    let server = TestServer::start_on(repo, &[]);
    let mut c = client(&server).await;
    let all = c.repository_index(RepositoryIndexRequest::default()).await.unwrap().into_inner().models;
    let topic = all.iter().find(|m| m.name == "topic").expect("topic listed");
    assert_eq!((topic.version.as_str(), topic.state.as_str()), ("1", "UNAVAILABLE"));
    assert!(topic.reason.contains("head.onnx"), "{}", topic.reason);
    let ready = c.repository_index(RepositoryIndexRequest { ready: true, ..Default::default() }).await.unwrap().into_inner().models;
    // The backbone's built-in embedding task is a ready model too.
    assert_eq!(ready.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["sent", "bert-tiny/embedding"]);
    let is_ready = |name: &str| ModelReadyRequest { name: name.into(), version: String::new() };
    assert!(c.model_ready(is_ready("sent")).await.unwrap().into_inner().ready);
    assert!(!c.model_ready(is_ready("topic")).await.unwrap().into_inner().ready);
    let load = |name: &str| RepositoryModelLoadRequest { model_name: name.into(), ..Default::default() };
    c.repository_model_load(load("sent")).await.expect("loading a ready model is a no-op");
    let err = c.repository_model_load(load("topic")).await.expect_err("failed model");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("head.onnx") && err.message().contains("after rescanning"), "{}", err.message());
    // Load re-reads the repository, as Triton's does: once the file is back, the model loads.
    std::fs::copy(test_repo().join("tasks/topic/1/head.onnx"), repo.join("tasks/topic/1/head.onnx")).unwrap();
    c.repository_model_load(load("topic")).await.expect("topic loads after its head is restored");
    assert!(c.model_ready(is_ready("topic")).await.unwrap().into_inner().ready);
    let err = c.repository_model_load(load("never-heard-of")).await.expect_err("unknown model");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("not in the model repository"), "{}", err.message());
}

#[tokio::test]
async fn kserve_requires_the_inference_token_when_one_is_set() {
    use adapterdrop_serve::kserve_proto::ServerLiveRequest;
    let server = TestServer::start(&[("ADAPTERDROP__AUTH__INFERENCE_TOKEN", "s3cret")]);
    let mut c = client(&server).await;
    let err = c.server_live(ServerLiveRequest {}).await.expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let mut req = tonic::Request::new(ServerLiveRequest {});
    req.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
    assert!(c.server_live(req).await.expect("with the token").into_inner().live);
}
