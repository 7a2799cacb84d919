//! The `adapterdrop.v1.Inference` service.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::{convert, deadline};
use crate::error::ServeError;
use crate::proto::inference_server::Inference;
use crate::proto::{GetTaskRequest, InferRequest, InferResponse, ListTasksRequest, ListTasksResponse, TaskInfo, TaskResult, Timings};
use crate::router::Router;
use crate::scheduler::Scheduler;

pub struct NativeApi {
    pub router: Arc<Router>,
    pub scheduler: Scheduler,
}

#[tonic::async_trait]
impl Inference for NativeApi {
    async fn infer(&self, request: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let started = Instant::now();
        let deadline = deadline::from_metadata(request.metadata());
        let req = request.into_inner();
        let span = tracing::info_span!("infer", tasks = ?req.tasks.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
        let result = async {
            let router = self.router.clone();
            // Tokenization is CPU work: keep it off the reactor threads.
            let job = tokio::task::spawn_blocking(move || router.prepare(req, deadline))
                .await
                .map_err(|e| ServeError::Internal(format!("tokenizer task failed: {e}")))??;
            let tokenize_us = started.elapsed().as_micros() as u64;
            let num_tokens = job.sequences.iter().map(|s| s.ids.len() as u32).collect();
            let runs = job.tasks.clone();
            let out = self.scheduler.submit(job).await?;
            let results = runs
                .iter()
                .zip(out.logits)
                .map(|(run, rows)| {
                    let head = &run.task.manifest.head;
                    TaskResult {
                        task: run.task.name().to_string(),
                        version: run.task.version(),
                        dropped_layers: run.active.dropped(),
                        sequences: rows.into_iter().map(|l| convert::sequence_result(l, head.kind, &head.labels)).collect(),
                    }
                })
                .collect();
            let timings = Timings {
                tokenize_us,
                queue_us: out.queue.as_micros() as u64,
                compute_us: out.compute.as_micros() as u64,
                total_us: started.elapsed().as_micros() as u64,
                batch_rows: out.batch_rows as u32,
            };
            Ok::<_, ServeError>(InferResponse { results, num_tokens, timings: Some(timings) })
        };
        match tracing::Instrument::instrument(result, span.clone()).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                tracing::info!(parent: &span, error_type = e.error_type(), error = %e, "infer rejected");
                Err(e.into())
            }
        }
    }

    async fn list_tasks(&self, _request: Request<ListTasksRequest>) -> Result<Response<ListTasksResponse>, Status> {
        let registry = &self.router.registry;
        let tasks = registry
            .entries()
            .iter()
            .map(|e| convert::task_info(e, registry.default_version(&e.name) == Some(e.version)))
            .collect();
        Ok(Response::new(ListTasksResponse { tasks }))
    }

    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<TaskInfo>, Status> {
        let req = request.into_inner();
        let registry = &self.router.registry;
        let default = registry.default_version(&req.name);
        let entries: Vec<_> = registry.entries().into_iter().filter(|e| e.name == req.name).collect();
        if entries.is_empty() {
            return Err(ServeError::NotFound(format!("task `{}` not found", req.name)).into());
        }
        let wanted = req.version.or(default).or_else(|| entries.iter().map(|e| e.version).max());
        let entry = entries.iter().find(|e| Some(e.version) == wanted).ok_or_else(|| {
            ServeError::NotFound(format!("task `{}` has no version {}", req.name, req.version.unwrap_or_default()))
        })?;
        Ok(Response::new(convert::task_info(entry, default == Some(entry.version))))
    }
}
