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
        // A status message travels as a header (grpc-message, percent-encoded); clients refuse
        // headers beyond their metadata limit (8-16 KiB), which would hide the real error.
        let message = e.to_string();
        let message = if message.len() > MAX_STATUS_MESSAGE { format!("{}…", cut(&message, MAX_STATUS_MESSAGE)) } else { message };
        Status::new(e.code(), message)
    }
}

/// Longest status message sent, in bytes (at most 3x that once percent-encoded).
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// Longest client string echoed in a message, in bytes.
pub const MAX_ECHO: usize = 64;

/// A client string as error messages echo it: cut to [`MAX_ECHO`] bytes (at a character
/// boundary) with its full length noted, so a 20 KB task name cannot blow up an error.
pub fn clip(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= MAX_ECHO {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(format!("{}… ({} bytes)", cut(s, MAX_ECHO), s.len()))
}

/// The longest prefix of `s` of at most `max` bytes that ends at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_strings_and_status_messages_are_cut() {
        assert_eq!(clip("sent"), "sent");
        let long = "é".repeat(10_000);
        let c = clip(&long);
        assert!(c.len() < MAX_ECHO + 20 && c.ends_with("(20000 bytes)"), "{c}");
        let status: Status = ServeError::NotFound(format!("task `{}` not found", "x".repeat(20_000))).into();
        assert!(status.message().len() <= MAX_STATUS_MESSAGE + 3);
        assert_eq!(status.code(), Code::NotFound);
    }
}
