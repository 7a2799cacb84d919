//! The `adapterdrop.v1.Inference` service.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::stream::{self, Answers, StreamPolicy};
use super::{deadline, request_id};
use crate::error::{ServeError, clip};
use crate::proto::infer_stream_response as stream_response;
use crate::proto::inference_server::Inference;
use crate::proto::{
    Error, GetTaskRequest, InferRequest, InferResponse, InferStreamResponse, ListTasksRequest, ListTasksResponse, TaskInfo, TaskResult,
    Timings,
};
use crate::router::Router;
use crate::scheduler::Scheduler;

pub struct NativeApi {
    pub router: Arc<Router>,
    pub scheduler: Scheduler,
    pub streams: StreamPolicy,
}

impl NativeApi {
    /// One inference, shared by the unary and streaming RPCs.
    async fn run(
        router: Arc<Router>,
        scheduler: Scheduler,
        req: InferRequest,
        deadline: Option<Instant>,
        request_id: &str,
    ) -> Result<InferResponse, ServeError> {
        let started = Instant::now();
        let id = req.id.clone();
        let task_names = metric_names(&req.tasks);
        let want_fusion = req.return_fusion_weights;
        let shaping = super::results::Shaping::from_request(&req);
        let span = tracing::info_span!(
            "infer",
            request_id,
            id = %clip(&id),
            task_count = req.tasks.len(),
            tasks = %logged_names(&req.tasks)
        );
        let work = async {
            // Admit (or refuse) before any work is spent on the request.
            let admission = scheduler.admit(deadline)?;
            // Tokenization is CPU work: keep it off the reactor threads. The queue place travels
            // with it, so a cancelled call frees its place only when the tokenizer is done.
            let (admission, job) = tokio::task::spawn_blocking(move || (admission, router.prepare(req, deadline)))
                .await
                .map_err(|e| ServeError::Internal(format!("tokenizer task failed: {e}")))?;
            let job = job?;
            let tokenize_us = started.elapsed().as_micros() as u64;
            let num_tokens = job.sequences.iter().map(|s| s.ids.len() as u32).collect();
            let runs = job.tasks.clone();
            let text = job.text.clone();
            let out = scheduler.submit(admission, job).await?;
            let mut fusion = out.fusion.into_iter();
            let results = runs
                .iter()
                .zip(out.logits)
                .enumerate()
                .map(|(i, (run, rows))| {
                    let weights = fusion.next().unwrap_or_default();
                    Ok(TaskResult {
                        task: run.task.name().to_string(),
                        version: run.task.version(),
                        dropped_layers: run.active.dropped(),
                        sequences: super::results::task_sequences(run, i, rows, text.as_deref(), &shaping)?,
                        fusion_weights: if want_fusion { super::fusion::fusion_weights(&weights) } else { Vec::new() },
                    })
                })
                .collect::<Result<Vec<_>, ServeError>>()?;
            let timings = Timings {
                tokenize_us,
                queue_us: out.queue.as_micros() as u64,
                compute_us: out.compute.as_micros() as u64,
                total_us: started.elapsed().as_micros() as u64,
                batch_rows: out.batch_rows as u32,
                real_tokens: out.stats.real_tokens as u64,
                computed_tokens: out.stats.computed_tokens as u64,
                attention_tokens: out.stats.attention_tokens as u64,
            };
            Ok::<_, ServeError>(InferResponse { results, num_tokens, timings: Some(timings), id })
        };
        let result = work.instrument(span.clone()).await;
        let names: Vec<&str> = task_names.iter().map(String::as_str).collect();
        scheduler.context().metrics.record_request("native", &names, result.as_ref().map(|_| ()), started.elapsed());
        if let Err(e) = &result {
            tracing::info!(parent: &span, error_type = e.error_type(), error = %e, "infer rejected");
        }
        result
    }
}

/// Task names a log line shows; the rest are counted (`task_count`), so a request naming
/// thousands of tasks cannot write them all into one line.
const LOGGED_TASKS: usize = 8;

/// The first [`LOGGED_TASKS`] task names, each cut like error messages cut client strings.
fn logged_names(tasks: &[crate::proto::TaskRef]) -> String {
    let mut shown: Vec<String> = tasks.iter().take(LOGGED_TASKS).map(|t| format!("{:?}", clip(&t.name))).collect();
    if tasks.len() > LOGGED_TASKS {
        shown.push(format!("… (+{} more)", tasks.len() - LOGGED_TASKS));
    }
    format!("[{}]", shown.join(", "))
}

/// The names `Metrics::record_request` reads: it labels at most `MAX_LABELLED_TASKS` and counts
/// any surplus as `unknown`, so one past that is all it needs (not every name a client sent).
fn metric_names(tasks: &[crate::proto::TaskRef]) -> Vec<String> {
    tasks.iter().take(crate::metrics::MAX_LABELLED_TASKS + 1).map(|t| t.name.clone()).collect()
}

type ResponseStream = Answers<InferStreamResponse>;

#[tonic::async_trait]
impl Inference for NativeApi {
    async fn infer(&self, request: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request_id = request_id::of(request.metadata());
        let req = request.into_inner();
        let tasks = metric_names(&req.tasks);
        let started = Instant::now();
        let work = Self::run(self.router.clone(), self.scheduler.clone(), req, deadline, &request_id);
        let resp = match deadline {
            // Answer DEADLINE_EXCEEDED ourselves, just before tonic's transport layer would cancel
            // the call with a bare CANCELLED.
            Some(d) => match tokio::time::timeout_at(deadline::answer_by(d), work).await {
                Ok(result) => result?,
                Err(_) => {
                    let e = ServeError::DeadlineExceeded("deadline exceeded before the result was ready".into());
                    let names: Vec<&str> = tasks.iter().map(String::as_str).collect();
                    self.scheduler.context().metrics.record_request("native", &names, Err(&e), started.elapsed());
                    tracing::info!(request_id, error_type = e.error_type(), "infer timed out");
                    return Err(e.into());
                }
            },
            None => work.await?,
        };
        Ok(Response::new(resp))
    }

    type InferStreamStream = ResponseStream;

    async fn infer_stream(&self, request: Request<Streaming<InferRequest>>) -> Result<Response<ResponseStream>, Status> {
        let deadline = deadline::from_metadata(request.metadata());
        let request_id = request_id::of(request.metadata());
        let (router, scheduler) = (self.router.clone(), self.scheduler.clone());
        let answers = stream::serve(request.into_inner(), &self.streams, move |req: InferRequest| {
            let (router, scheduler, request_id) = (router.clone(), scheduler.clone(), request_id.clone());
            async move {
                let id = req.id.clone();
                let result = match Self::run(router, scheduler, req, deadline, &request_id).await {
                    Ok(resp) => stream_response::Result::Response(resp),
                    Err(e) => stream_response::Result::Error(Error { code: e.code() as i32, message: e.to_string() }),
                };
                InferStreamResponse { id, result: Some(result) }
            }
        });
        Ok(Response::new(answers))
    }

    async fn list_tasks(&self, _request: Request<ListTasksRequest>) -> Result<Response<ListTasksResponse>, Status> {
        Ok(Response::new(ListTasksResponse { tasks: super::tasks::list(&self.router.registry) }))
    }

    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<TaskInfo>, Status> {
        let req = request.into_inner();
        Ok(Response::new(super::tasks::get(&self.router.registry, &req.name, req.version)?))
    }
}
