//! gRPC services. Handlers stay thin: they convert messages and call the router and scheduler.

pub mod convert;
pub mod deadline;
pub mod fusion;
pub mod health;
pub mod kserve;
pub mod native;
pub mod request_id;
pub mod results;
pub mod stream;
pub mod tasks;
