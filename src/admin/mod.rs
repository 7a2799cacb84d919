//! The admin port: `adapterdrop.v1.Admin` (run-time task registration), `grpc.health.v1` and
//! reflection, behind a bearer token (`auth.admin_token`) when one is configured.

pub mod auth;
pub mod service;
pub mod upload;
pub mod weights_only;

use std::sync::Arc;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::layer::util::{Identity, Stack};

pub use auth::BearerAuth;
pub use service::AdminApi;

use crate::api::request_id::RequestIdLayer;
use crate::config::Settings;
use crate::proto::admin_server::AdminServer;
use crate::repository::Registrar;
use crate::server::StartError;

/// Every service of the admin port on `builder` (the caller configures transport, e.g. TLS, on the
/// builder). Health answers without a token, so probes work; Admin requires `auth.admin_token`.
/// Calls get an `x-request-id` as on the inference port, so registrations can be traced in logs.
pub fn routes(
    builder: Server,
    registrar: Arc<Registrar>,
    health: HealthReporter,
    settings: &Settings,
) -> Result<Router<Stack<RequestIdLayer, Identity>>, StartError> {
    let max = settings.server.max_message_bytes;
    let api =
        AdminServer::new(AdminApi { registrar, upload: upload::UploadLimits::from_settings(&settings.admin), health: health.clone() })
            .max_decoding_message_size(max)
            .max_encoding_message_size(settings.server.max_response_bytes());
    let auth = BearerAuth::new(&settings.auth.admin_token, "admin", "auth.admin_token");
    if !auth.required() {
        tracing::warn!("the admin service accepts requests without a token: set auth.admin_token (ADAPTERDROP__AUTH__ADMIN_TOKEN)");
    }
    let (reflection, reflection_v1alpha) = crate::server::reflection_services()?;
    Ok(builder
        .layer(RequestIdLayer)
        .add_service(HealthServer::new(HealthService::from_health_reporter(health)))
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(api, auth)))
}
