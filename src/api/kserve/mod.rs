//! `inference.GRPCInferenceService`: the Open Inference Protocol (KServe v2) over gRPC, so that
//! Triton/KServe clients (tritonclient, perf_analyzer) work unchanged. Tasks are the models and
//! their versions the model versions. Inference builds the same internal request the native API
//! does and goes through the same router and scheduler, so requests of both APIs batch together.

mod choices;
pub mod decode;
pub mod encode;
mod inputs;
pub mod model;
mod token_outputs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::deadline;
use super::stream::{self, Answers, StreamPolicy};
use crate::config::BatchingSettings;
use crate::error::{ServeError, clip};
use crate::kserve_proto::grpc_inference_service_server::GrpcInferenceService;
use crate::kserve_proto::infer_parameter::ParameterChoice;
use crate::kserve_proto::*;
use crate::router::Router;
use crate::scheduler::Scheduler;

/// Extensions announced in ServerMetadata.
const EXTENSIONS: &[&str] = &["model_configuration", "model_repository", "statistics", "parameters"];

pub struct KServeApi {
    pub router: Arc<Router>,
    pub scheduler: Scheduler,
    pub batching: BatchingSettings,
    /// Set when shutdown starts: ServerReady then answers false.
    pub draining: Arc<AtomicBool>,
    /// RepositoryModelLoad rescans the repository through it.
    pub registrar: Arc<crate::repository::Registrar>,
    pub streams: StreamPolicy,
}

impl KServeApi {
    /// One inference, shared by ModelInfer and ModelStreamInfer.
    async fn run(
        router: Arc<Router>,
        scheduler: Scheduler,
        req: ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, ServeError> {
        let (model, id) = (req.model_name.clone(), req.id.clone());
        let model_name = model.clone();
        // Client strings in a log line are cut as error messages cut them (a model name may be megabytes).
        let span = tracing::info_span!("model_infer", model = %clip(&model), id = %clip(&id));
        let ctx = scheduler.context().clone();
        let work = async move {
            // Admit (or refuse) before any work is spent on the request.
            let admission = scheduler.admit(deadline)?;
            let prepare = move || {
                let mut d = decode::decode(req, &router.limits)?;
                let deadline = match (deadline, d.timeout.map(|t| Instant::now() + t)) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let native = std::mem::take(&mut d.native);
                let mut shaping = crate::api::results::Shaping::from_request(&native);
                let job = router.prepare(native, deadline)?;
                shaping.thresholds = request_thresholds(&job.tasks, d.threshold)
                    .inspect_err(|_| router.ctx.stats.request_failed(&crate::engine::stat_keys(&job.tasks), job.received.elapsed()))?;
                // Unknown output names are refused before any compute is spent.
                let plan = encode::plan(&job.tasks, &d.prefixes, &d.outputs)
                    .inspect_err(|_| router.ctx.stats.request_failed(&crate::engine::stat_keys(&job.tasks), job.received.elapsed()))?;
                Ok::<_, ServeError>((d, job, plan, shaping))
            };
            // Tensor decoding and tokenization are CPU work: keep them off the reactor threads. The
            // queue place travels with it, so a cancelled call frees its place only when that is done.
            let (admission, prepared) = tokio::task::spawn_blocking(move || (admission, prepare()))
                .await
                .map_err(|e| ServeError::Internal(format!("request decoding task failed: {e}")))?;
            let (decoded, job, plan, shaping) = prepared?;
            let runs = job.tasks.clone();
            let text = job.text.clone();
            let timeout = decoded.timeout;
            let out = match (timeout, job.deadline) {
                (Some(_), Some(d)) => {
                    tokio::time::timeout_at(deadline::answer_by(d), scheduler.submit(admission, job)).await.map_err(|_| {
                        ServeError::DeadlineExceeded("the request's `timeout` parameter passed before the result was ready".into())
                    })??
                }
                _ => scheduler.submit(admission, job).await?,
            };
            let (outputs, raw_output_contents) = encode::encode(&runs, &plan, out.logits, text.as_deref(), &shaping)?;
            let mut parameters = std::collections::HashMap::new();
            for (run, prefix) in runs.iter().zip(&decoded.prefixes) {
                let dropped = run.active.dropped().iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                parameters.insert(
                    format!("{prefix}dropped_layers"),
                    InferParameter { parameter_choice: Some(ParameterChoice::StringParam(dropped)) },
                );
            }
            Ok(ModelInferResponse {
                model_name: model,
                model_version: runs[0].task.version().to_string(),
                id,
                parameters,
                outputs,
                raw_output_contents,
            })
        };
        let started = Instant::now();
        let result: Result<ModelInferResponse, ServeError> = work.instrument(span.clone()).await;
        ctx.metrics.record_request("kserve", &[model_name.as_str()], result.as_ref().map(|_| ()), started.elapsed());
        if let Err(e) = &result {
            tracing::info!(parent: &span, error_type = e.error_type(), error = %e, "model_infer rejected");
        }
        result
    }

    fn ready_version(&self, name: &str, version: &str) -> Result<Arc<crate::repository::Task>, ServeError> {
        let v = decode::parse_version(name, version)?;
        self.router.registry.resolve(name, v)
    }

    fn ready_versions(&self, name: &str) -> Vec<String> {
        let entries = self.router.registry.entries_named(name);
        entries.iter().filter(|e| e.state == crate::repository::TaskState::Ready).map(|e| e.version.to_string()).collect()
    }

    fn known(&self, name: &str) -> Result<(), ServeError> {
        if !self.router.registry.entries_named(name).is_empty() {
            Ok(())
        } else {
            Err(ServeError::NotFound(format!("model `{name}` not found")))
        }
    }
}

/// The `threshold` parameter applies to every multi-label task of the request; naming one for a
/// request without any is refused, as a native threshold on another task is.
fn request_thresholds(tasks: &[crate::engine::TaskRun], threshold: Option<f32>) -> Result<Vec<Option<f32>>, ServeError> {
    let multilabel = |t: &crate::engine::TaskRun| t.task.manifest.head.kind == crate::repository::manifest::HeadKind::MultiLabel;
    if threshold.is_some() && !tasks.iter().any(multilabel) {
        return Err(ServeError::InvalidArgument(
            "parameter `threshold` is for multi-label tasks, and this request has none: omit it".into(),
        ));
    }
    Ok(tasks.iter().map(|t| threshold.filter(|_| multilabel(t))).collect())
}

type StreamResponse = Answers<ModelStreamInferResponse>;

#[tonic::async_trait]
impl GrpcInferenceService for KServeApi {
    async fn server_live(&self, _: Request<ServerLiveRequest>) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(&self, _: Request<ServerReadyRequest>) -> Result<Response<ServerReadyResponse>, Status> {
        Ok(Response::new(ServerReadyResponse { ready: !self.draining.load(Ordering::Relaxed) }))
    }

    async fn model_ready(&self, request: Request<ModelReadyRequest>) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.into_inner();
        let v = decode::parse_version(&r.name, &r.version)?;
        let ready = !self.draining.load(Ordering::Relaxed) && self.router.registry.resolve(&r.name, v).is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(&self, _: Request<ServerMetadataRequest>) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }))
    }

    async fn model_metadata(&self, request: Request<ModelMetadataRequest>) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = request.into_inner();
        let task = self.ready_version(&r.name, &r.version)?;
        Ok(Response::new(model::metadata(&task, self.ready_versions(&r.name))))
    }

    async fn model_infer(&self, request: Request<ModelInferRequest>) -> Result<Response<ModelInferResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let started = Instant::now();
        let req = request.into_inner();
        let model_name = req.model_name.clone();
        let work = Self::run(self.router.clone(), self.scheduler.clone(), req, deadline);
        let resp = match deadline {
            // As in the native API: answer DEADLINE_EXCEEDED before the transport cancels.
            Some(d) => tokio::time::timeout_at(deadline::answer_by(d), work).await.map_err(|_| {
                let e = ServeError::DeadlineExceeded("deadline exceeded before the result was ready".into());
                // `run` was cut short before it could count this answer.
                self.scheduler.context().metrics.record_request("kserve", &[model_name.as_str()], Err(&e), started.elapsed());
                e
            })??,
            None => work.await?,
        };
        Ok(Response::new(resp))
    }

    type ModelStreamInferStream = StreamResponse;

    async fn model_stream_infer(&self, request: Request<Streaming<ModelInferRequest>>) -> Result<Response<StreamResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let (router, scheduler) = (self.router.clone(), self.scheduler.clone());
        // A bad request gets an answer with error_message (and its id); the stream stays open.
        let answers = stream::serve(request.into_inner(), &self.streams, move |req: ModelInferRequest| {
            let (router, scheduler) = (router.clone(), scheduler.clone());
            async move {
                let (model_name, model_version, id) = (req.model_name.clone(), req.model_version.clone(), req.id.clone());
                match Self::run(router, scheduler, req, deadline).await {
                    Ok(resp) => ModelStreamInferResponse { error_message: String::new(), infer_response: Some(resp) },
                    Err(e) => ModelStreamInferResponse {
                        error_message: format!("{:?}: {e}", e.code()),
                        infer_response: Some(ModelInferResponse { model_name, model_version, id, ..Default::default() }),
                    },
                }
            }
        });
        Ok(Response::new(answers))
    }

    async fn model_config(&self, request: Request<ModelConfigRequest>) -> Result<Response<ModelConfigResponse>, Status> {
        let r = request.into_inner();
        let task = self.ready_version(&r.name, &r.version)?;
        let config = model::config(&task, &self.router.limits, &self.batching);
        Ok(Response::new(ModelConfigResponse { config: Some(config) }))
    }

    async fn model_statistics(&self, request: Request<ModelStatisticsRequest>) -> Result<Response<ModelStatisticsResponse>, Status> {
        let r = request.into_inner();
        let version = decode::parse_version(&r.name, &r.version)?;
        if !r.name.is_empty() {
            self.known(&r.name)?;
        }
        let counters =
            self.scheduler.context().stats.snapshot(|n, v| (r.name.is_empty() || n == r.name) && version.is_none_or(|want| want == v));
        // Every ready version is listed (zeros until first used), as Triton lists loaded models.
        let mut model_stats = Vec::new();
        for e in self.router.registry.entries() {
            let selected = (r.name.is_empty() || e.name == r.name) && version.is_none_or(|v| v == e.version);
            if !selected || e.state != crate::repository::TaskState::Ready {
                continue;
            }
            let s = counters.iter().find(|((n, v), _)| *n == e.name && *v == e.version).map(|(_, s)| s.clone()).unwrap_or_default();
            model_stats.push(model::statistics(&e.name, e.version, &s));
        }
        if model_stats.is_empty() && version.is_some() {
            return Err(ServeError::NotFound(format!("model `{}` has no ready version {}", r.name, r.version)).into());
        }
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    async fn repository_index(&self, request: Request<RepositoryIndexRequest>) -> Result<Response<RepositoryIndexResponse>, Status> {
        let ready_only = request.into_inner().ready;
        let models = self
            .router
            .registry
            .entries()
            .iter()
            .filter(|e| !ready_only || e.state == crate::repository::TaskState::Ready)
            .map(model::index_entry)
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }

    /// Loading new tasks at run time belongs to task registration (the admin service); until
    /// that is wired here, Load succeeds only for a task that is already ready, which is then a no-op.
    async fn repository_model_load(
        &self,
        request: Request<RepositoryModelLoadRequest>,
    ) -> Result<Response<RepositoryModelLoadResponse>, Status> {
        let r = request.into_inner();
        if r.model_name.is_empty() {
            return Err(ServeError::InvalidArgument("model_name is empty".into()).into());
        }
        if !r.parameters.is_empty() {
            let keys: Vec<&String> = r.parameters.keys().collect();
            return Err(ServeError::Unimplemented(format!(
                "RepositoryModelLoad parameters {keys:?} (config or file overrides) are not supported"
            ))
            .into());
        }
        let registry = &self.router.registry;
        if registry.default_version(&r.model_name).is_some() {
            tracing::info!(model = %clip(&r.model_name), "RepositoryModelLoad: already loaded and ready; nothing to do");
            return Ok(Response::new(RepositoryModelLoadResponse {}));
        }
        // Load = (re)read the repository from disk, as Triton does: picks up a task directory copied
        // in by an operator or another replica, and retries versions that failed to load.
        let changed = self.registrar.reconcile().await?;
        let retried = self.registrar.retry_failed(&r.model_name).await?;
        tracing::info!(model = %clip(&r.model_name), changed, retried, "RepositoryModelLoad: repository rescanned");
        if registry.default_version(&r.model_name).is_some() {
            return Ok(Response::new(RepositoryModelLoadResponse {}));
        }
        self.known(&r.model_name).map_err(|_| {
            ServeError::NotFound(format!(
                "model `{}` is not in the model repository; copy its task directory into <repository>/tasks/{}/<version>/ \
                 or register it through the admin service (adapterdrop.v1.Admin on the admin port), then load again",
                r.model_name, r.model_name
            ))
        })?;
        let reason = registry.resolve(&r.model_name, None).err().map(|e| e.to_string()).unwrap_or_default();
        Err(ServeError::FailedPrecondition(format!(
            "model `{}` has no ready version after rescanning the repository: {reason}",
            r.model_name
        ))
        .into())
    }

    async fn repository_model_unload(
        &self,
        request: Request<RepositoryModelUnloadRequest>,
    ) -> Result<Response<RepositoryModelUnloadResponse>, Status> {
        let r = request.into_inner();
        self.known(&r.model_name)?;
        Err(ServeError::Unimplemented(format!(
            "unloading model `{}` over KServe is not supported: the repository on disk is the source of truth, so removing a task \
             deletes it, which only the token-guarded admin service may do (adapterdrop.v1.Admin/UnregisterTask on the admin port)",
            r.model_name
        ))
        .into())
    }
}
