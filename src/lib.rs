//! adapterdrop-serve: one ONNX backbone, many adapter tasks, lower layers shared via AdapterDrop.
//!
//! Data flow: [`api`] (gRPC) -> [`router`] (validation, tokenization) -> [`scheduler`] (batching)
//! -> [`engine`] (execution plan over shared rows) -> [`runtime`] (ONNX Runtime), with
//! [`repository`] holding what is loaded. [`server::App`] owns one server's state and hands its
//! [`context::Context`] (metrics, statistics) down; errors are typed per layer and mapped to a
//! gRPC status in [`error`].

pub mod admin;
pub mod api;
pub mod codec;
pub mod config;
pub mod context;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod repository;
pub mod router;
pub mod runtime;
pub mod scheduler;
pub mod server;
pub mod stats;
pub mod telemetry;
pub mod tls;

/// Generated code of `proto/adapterdrop/v1/adapterdrop.proto`.
pub mod proto {
    tonic::include_proto!("adapterdrop.v1");
    /// Encoded descriptors of every proto this server defines, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));
}

/// Generated code of `proto/kserve/*.proto`: the Open Inference Protocol (KServe v2), package
/// `inference`, wire-compatible with Triton's. Its descriptors are in [`proto::FILE_DESCRIPTOR_SET`].
pub mod kserve_proto {
    tonic::include_proto!("inference");
}
