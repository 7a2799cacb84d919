//! gRPC services. Handlers stay thin: they convert messages and call the router and scheduler.

pub mod convert;
pub mod deadline;
pub mod fusion;
pub mod native;
