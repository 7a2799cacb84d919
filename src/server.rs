//! Assembles the services on one gRPC port and runs them until shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::api::kserve::KServeApi;
use crate::api::native::NativeApi;
use crate::config::Settings;
use crate::context::Context;
use crate::kserve_proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::inference_server::InferenceServer;
use crate::repository::{Registrar, Registry, TaskState};
use crate::router::Router;
use crate::runtime::{Runtime, RuntimeError};
use crate::scheduler::Scheduler;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("model repository {path} does not exist (run `make models` or set repository.path)")]
    NoRepository { path: String },
    #[error("model repository: {0}")]
    Repository(#[from] crate::error::LoadError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection set-up failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Every request finished before the grace period ran out.
    pub drained: bool,
    /// Requests admitted and still unanswered when the grace period ran out.
    pub abandoned: usize,
}

/// Accepted connections get TCP_NODELAY: without it Nagle's algorithm holds small answers back
/// until the peer's delayed ACK (about 40 ms on Linux).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// gRPC reflection over every service this server defines plus health, as `grpc.reflection.v1`
/// and as `grpc.reflection.v1alpha`, which many stock clients still speak (grpcio-reflection's
/// descriptor pool, grpc_requests, older grpcurl). Served on the inference and the admin port.
#[allow(clippy::type_complexity)]
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
    ),
    StartError,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// Everything loaded and ready to accept connections. Owns all of one server's state (no
/// process-wide globals), so a process can run several, e.g. tests on `127.0.0.1:0`.
pub struct App {
    pub settings: Settings,
    pub registry: Arc<Registry>,
    pub runtime: Runtime,
    /// This server's metrics and statistics, handed to every layer that records.
    pub ctx: Arc<Context>,
}

impl App {
    /// Loads ONNX Runtime and the repository. Fails only on problems no request could survive.
    pub fn load(settings: Settings) -> Result<Self, StartError> {
        let runtime = Runtime::init(&settings.runtime)?;
        Self::load_with(settings, runtime)
    }

    /// Loads the repository on an ONNX Runtime already initialised: ONNX Runtime allows one
    /// environment per process, so further servers in the same process share it (and its graphs).
    pub fn load_with(settings: Settings, runtime: Runtime) -> Result<Self, StartError> {
        let root = &settings.repository.path;
        if !root.is_dir() {
            return Err(StartError::NoRepository { path: root.display().to_string() });
        }
        let registry = Arc::new(Registry::open_with(&runtime, root, settings.repository.readahead_tasks)?);
        let ctx = Context::new();
        ctx.metrics.label_tasks_of(&registry);
        Ok(Self { settings, registry, runtime, ctx })
    }

    /// Binds the configured address.
    pub async fn bind(&self) -> Result<TcpListener, StartError> {
        let addr = self.settings.server.listen.clone();
        TcpListener::bind(&addr).await.map_err(|source| StartError::Listen { addr, source })
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests (idle streams are ended).
    pub async fn serve(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send) -> Result<Stopped, StartError> {
        let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: "?".into(), source })?;
        let (health, health_service) = tonic_health::server::health_reporter();
        // A task name is SERVING exactly when a request without a version would be served: it has a
        // ready default version, whatever state its other versions are in.
        for name in self.registry.entries().into_iter().map(|e| e.name).collect::<std::collections::BTreeSet<_>>() {
            let ready = self.registry.default_version(&name).is_some();
            health.set_service_status(&name, if ready { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
        }
        let scheduler = Scheduler::start(self.settings.batching.clone(), self.settings.engine.clone(), self.ctx.clone());
        crate::engine::executor::shrink_above(self.settings.batching.max_batch_tokens);
        let router = Arc::new(Router { registry: self.registry.clone(), limits: self.settings.limits.clone(), ctx: self.ctx.clone() });
        let (max, max_out) = (self.settings.server.max_message_bytes, self.settings.server.max_response_bytes());
        // KServe v2 on the same port, same router and scheduler: requests of both APIs batch together.
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop_streams, stopping) = tokio::sync::watch::channel(false);
        let streams = crate::api::stream::StreamPolicy::new(self.settings.server.max_stream_in_flight, stopping);
        let registrar = Arc::new(
            Registrar::new(self.registry.clone(), self.runtime.clone())
                .with_limits(crate::repository::ValidationLimits::from_settings(&self.settings.admin)),
        );
        let kserve_api = KServeApi {
            router: router.clone(),
            scheduler: scheduler.clone(),
            batching: self.settings.batching.clone(),
            draining: draining.clone(),
            registrar: registrar.clone(),
            streams: streams.clone(),
        };
        let kserve = GrpcInferenceServiceServer::new(kserve_api).max_decoding_message_size(max).max_encoding_message_size(max_out);
        let native = InferenceServer::new(NativeApi { router, scheduler: scheduler.clone(), streams })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max_out);
        // Inference requires auth.inference_token when one is set; health and reflection never do.
        let inference_auth = crate::admin::BearerAuth::new(&self.settings.auth.inference_token, "inference", "auth.inference_token");
        let native = tonic::service::interceptor::InterceptedService::new(native, inference_auth.clone());
        let kserve = tonic::service::interceptor::InterceptedService::new(kserve, inference_auth);
        health.set_serving::<InferenceServer<NativeApi>>().await;
        health.set_serving::<GrpcInferenceServiceServer<KServeApi>>().await;
        health.set_service_status("", ServingStatus::Serving).await;
        let (reflection, reflection_v1alpha) = reflection_services()?;
        let metrics_task = self.start_metrics().await?;
        let tls = crate::tls::server_config(&self.settings.tls, false)?;
        let admin_listener = match self.settings.admin.listen.as_str() {
            "" => None,
            a => Some(TcpListener::bind(a).await.map_err(|source| StartError::Listen { addr: a.to_string(), source })?),
        };
        let ready = self.registry.entries().iter().filter(|e| e.state == TaskState::Ready).count();
        tracing::info!(%addr, tls = tls.is_some(), tasks_ready = ready, ort = self.runtime.version(), "listening");
        // Run-time lifecycle: per-task health follows the registry; the admin port and the
        // repository poll change it. All stop when shutdown begins.
        let (admin_stop_tx, admin_stop) = tokio::sync::watch::channel(false);
        let admin = match admin_listener {
            Some(l) => {
                let admin_addr = l.local_addr().map_err(|source| StartError::Listen { addr: "?".into(), source })?;
                // The admin port requires client certificates when tls.client_ca_path is set.
                let mut builder = tonic::transport::Server::builder();
                if let Some(tls) = crate::tls::server_config(&self.settings.tls, true)? {
                    builder = builder.tls_config(tls)?;
                }
                let routes = crate::admin::routes(builder, registrar.clone(), health.clone(), &self.settings)?;
                tracing::info!(admin = %admin_addr, "admin service up");
                let mut stop = admin_stop.clone();
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                Some(tokio::spawn(async move {
                    if let Err(e) = routes.serve_with_incoming_shutdown(incoming(l), stopped).await {
                        tracing::error!(error = %e, "admin server failed");
                    }
                }))
            }
            None => None,
        };
        let follower = crate::api::health::follow(self.registry.clone(), health.clone());
        let engine_watch = crate::api::health::follow_engine(
            scheduler.liveness().subscribe(),
            health.clone(),
            self.registry.clone(),
            follower.abort_handle(),
            draining.clone(),
        );
        let poller = match self.settings.repository.poll_interval_s {
            0 => None,
            s => Some(registrar.clone().spawn_poller(std::time::Duration::from_secs(s))),
        };
        // On shutdown: report NOT_SERVING everywhere first (load balancers stop sending), then let
        // tonic stop accepting and drain in-flight requests, which also drains the queue.
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let registry = self.registry.clone();
        let signal = async move {
            shutdown.await;
            follower.abort();
            engine_watch.abort();
            if let Some(p) = poller {
                p.abort();
            }
            let _ = admin_stop_tx.send(true);
            draining.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut health = health;
            crate::api::health::not_serving(&health, &registry).await;
            // Idle streams would hold the drain for the whole grace period: streams stop reading
            // and end once their answers are out; Watch streams end after seeing NOT_SERVING.
            let _ = stop_streams.send(true);
            crate::api::health::end_watches(&mut health, &registry).await;
            tracing::info!("draining in-flight requests");
            let _ = stopping_tx.send(());
        };
        // HTTP/2 streams per connection bound the messages one connection can have buffered at
        // once (each up to server.max_message_bytes); see README "Memory bounds".
        let mut builder = tonic::transport::Server::builder().max_concurrent_streams(self.settings.limits.max_concurrent_streams);
        if self.settings.server.max_connection_age_s > 0 {
            builder = builder.max_connection_age(std::time::Duration::from_secs(self.settings.server.max_connection_age_s));
        }
        if let Some(tls) = tls {
            builder = builder.tls_config(tls)?;
        }
        let serve = builder
            .layer(crate::api::request_id::RequestIdLayer)
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(native)
            .add_service(kserve)
            .serve_with_incoming_shutdown(incoming(listener), signal);
        let grace = std::time::Duration::from_secs(self.settings.server.shutdown_grace_s);
        let mut stopped = Stopped { drained: true, abandoned: 0 };
        tokio::select! {
            result = serve => result?,
            _ = async { if stopping_rx.await.is_ok() { tokio::time::sleep(grace).await } else { std::future::pending().await } } => {
                stopped = Stopped { drained: false, abandoned: scheduler.in_flight() };
                tracing::error!(grace_s = grace.as_secs(), requests_abandoned = stopped.abandoned, "grace period over; exiting with requests unanswered");
            }
        }
        if let Some(admin) = admin {
            let _ = tokio::time::timeout(grace, admin).await;
        }
        if let Some(task) = metrics_task {
            task.abort();
        }
        tracing::info!(drained = stopped.drained, "server stopped");
        Ok(stopped)
    }

    /// Binds the metrics port (when configured) before the gRPC port reports `listening`, so
    /// whoever waits for that line can scrape at once.
    async fn start_metrics(&self) -> Result<Option<tokio::task::JoinHandle<()>>, StartError> {
        let addr = self.settings.metrics.listen.clone();
        if addr.is_empty() {
            return Ok(None);
        }
        let listener = TcpListener::bind(&addr).await.map_err(|source| StartError::Listen { addr: addr.clone(), source })?;
        let bound = listener.local_addr().map_err(|source| StartError::Listen { addr, source })?;
        tracing::info!(metrics_addr = %bound, "metrics endpoint on http://{bound}/metrics");
        Ok(Some(tokio::spawn(crate::metrics::http::serve(listener, self.registry.clone(), self.ctx.clone()))))
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_grpc_connections_have_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = incoming.next().await.unwrap().unwrap();
        assert!(stream.nodelay().unwrap());
    }
}
