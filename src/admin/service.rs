//! The `adapterdrop.v1.Admin` service: thin handlers over [`Registrar`].

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;

use super::upload;
use crate::api::{request_id, tasks};
use crate::error::ServeError;
use crate::proto::admin_server::Admin;
use crate::proto::{
    GetTaskRequest, ListTasksRequest, ListTasksResponse, RegisterTaskRequest, RegisterTaskResponse, SetDefaultVersionRequest, TaskInfo,
    UnregisterTaskRequest, UnregisterTaskResponse,
};
use crate::repository::{RegisterOptions, Registrar};

pub struct AdminApi {
    pub registrar: Arc<Registrar>,
    pub upload: upload::UploadLimits,
    /// The server's health reporter: a change is visible on health before its RPC answers
    /// (the registry follower in `api::health` would report it a moment later).
    pub health: HealthReporter,
}

impl AdminApi {
    /// Sets `name`'s health status from the registry now (`api::health::report`).
    async fn report_health(&self, name: &str) {
        crate::api::health::report(&mut self.health.clone(), self.registrar.registry(), name).await;
    }
}

#[tonic::async_trait]
impl Admin for AdminApi {
    async fn register_task(&self, request: Request<Streaming<RegisterTaskRequest>>) -> Result<Response<RegisterTaskResponse>, Status> {
        let request_id = request_id::of(request.metadata());
        let mut stream = request.into_inner();
        let received = upload::receive(&mut stream, &self.registrar.tasks_root(), self.upload)
            .await
            .inspect_err(|e| log_refused(&request_id, "register", e))?;
        let h = &received.header;
        if let Some(meta) = &h.adapterhub {
            tokio::task::block_in_place(|| super::weights_only::prepare(received.bundle.dir(), meta, self.registrar.registry()))
                .inspect_err(|e| log_refused(&request_id, "register", e))?;
        }
        let opts = RegisterOptions { version: h.version, set_default: h.set_default, replace: h.replace };
        let name = h.name.clone();
        tracing::info!(request_id, task = %name, version = ?opts.version, bytes = received.bytes, files = received.files, "task bundle received");
        let done = self.registrar.register(&name, received.bundle, opts).await.inspect_err(|e| log_refused(&request_id, "register", e))?;
        self.report_health(&name).await;
        let registry = self.registrar.registry();
        Ok(Response::new(RegisterTaskResponse {
            task: Some(tasks::get(registry, &name, Some(done.entry.version))?),
            bytes_received: received.bytes,
            files_received: received.files as u32,
            validate_ms: done.validate.as_millis() as u64,
        }))
    }

    async fn unregister_task(&self, request: Request<UnregisterTaskRequest>) -> Result<Response<UnregisterTaskResponse>, Status> {
        let request_id = request_id::of(request.metadata());
        let req = request.into_inner();
        if req.version.is_some() == req.all_versions {
            return Err(ServeError::InvalidArgument("give exactly one of `version` and `all_versions = true`".into()).into());
        }
        let removed = self.registrar.unregister(&req.name, req.version).await.inspect_err(|e| log_refused(&request_id, "unregister", e))?;
        tracing::info!(request_id, task = %req.name, removed = removed.len(), "task versions unregistered");
        self.report_health(&req.name).await;
        let removed = removed.iter().map(|e| crate::api::convert::task_info(e, false)).collect();
        Ok(Response::new(UnregisterTaskResponse { removed }))
    }

    async fn set_default_version(&self, request: Request<SetDefaultVersionRequest>) -> Result<Response<TaskInfo>, Status> {
        let request_id = request_id::of(request.metadata());
        let req = request.into_inner();
        self.registrar.set_default(&req.name, req.version).await.inspect_err(|e| log_refused(&request_id, "set_default_version", e))?;
        tracing::info!(request_id, task = %req.name, version = ?req.version, "default version set");
        self.report_health(&req.name).await;
        Ok(Response::new(tasks::get(self.registrar.registry(), &req.name, None)?))
    }

    async fn list_tasks(&self, _request: Request<ListTasksRequest>) -> Result<Response<ListTasksResponse>, Status> {
        Ok(Response::new(ListTasksResponse { tasks: tasks::list(self.registrar.registry()) }))
    }

    async fn get_task(&self, request: Request<GetTaskRequest>) -> Result<Response<TaskInfo>, Status> {
        let req = request.into_inner();
        Ok(Response::new(tasks::get(self.registrar.registry(), &req.name, req.version)?))
    }
}

/// Refusals are logged with the caller's request id: the status alone does not say which upload
/// or which operator's call it answered.
fn log_refused(request_id: &str, op: &'static str, e: &ServeError) {
    tracing::info!(request_id, op, error_type = e.error_type(), error = %e, "admin call refused");
}
