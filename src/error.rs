//! One error type for everything a request can hit, mapped to a gRPC status in exactly one place.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// An operation this server does not offer (yet), e.g. KServe RepositoryModelUnload.
    #[error("{0}")]
    Unimplemented(String),
    #[error("request cancelled by the client")]
    Cancelled,
    #[error("ONNX Runtime failed: {0}")]
    Runtime(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    /// Stable label for logs and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "not_found",
            Self::InvalidArgument(_) => "invalid_argument",
            Self::ResourceExhausted(_) => "resource_exhausted",
            Self::FailedPrecondition(_) => "failed_precondition",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::Unavailable(_) => "unavailable",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Unimplemented(_) => "unimplemented",
            Self::Cancelled => "cancelled",
            Self::Runtime(_) => "runtime",
            Self::Internal(_) => "internal",
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NotFound,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Cancelled => Code::Cancelled,
            Self::Runtime(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<ort::Error> for ServeError {
    fn from(e: ort::Error) -> Self {
        Self::Runtime(e.to_string())
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// A request message that does not decode is the client's fault, not the server's (tonic-prost
/// says INTERNAL): INVALID_ARGUMENT with the decoder's message.
impl From<crate::codec::UndecodableMessage> for Status {
    fn from(e: crate::codec::UndecodableMessage) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// Why a backbone or task could not be loaded; always names the file.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct LoadError {
    pub file: String,
    pub problem: String,
}

impl LoadError {
    pub fn new(file: impl AsRef<std::path::Path>, problem: impl Into<String>) -> Self {
        Self { file: file.as_ref().display().to_string(), problem: problem.into() }
    }
}
