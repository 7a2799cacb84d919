//! Errors per layer, mapped to a gRPC status in exactly one place ([`ServeError::code`]).
//!
//! - Request: [`ServeError`]'s own variants (`InvalidArgument`, `NotFound`, ...) carry a message
//!   for the client; the API and router layers build them directly.
//! - Repository: [`RepositoryError`], what resolving or changing the task tables can hit.
//! - Engine: [`EngineError`], with ONNX Runtime's [`ort::Error`] kept as a typed source.
//!
//! Lower layers' errors travel inside `ServeError::Repository` / `ServeError::Engine`, so a log
//! line or a test can still match the typed cause (`std::error::Error::source`).

use std::sync::Arc;

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
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A request message that is not valid protobuf: the client's fault (tonic-prost says INTERNAL).
    #[error(transparent)]
    Undecodable(#[from] crate::codec::UndecodableMessage),
    /// A request message with more repeated elements than the codec's hard ceiling, refused from
    /// its wire bytes before decoding (decoding would cost many times its size).
    #[error(transparent)]
    TooManyElements(#[from] crate::codec::TooManyElements),
    /// A broken invariant of the server itself (a task that died, a channel that closed).
    #[error("internal error: {0}")]
    Internal(String),
}

/// What resolving a task reference or changing the repository can hit.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError {
    #[error("task `{name}` not found; known tasks: {known:?}")]
    UnknownTask { name: String, known: Vec<String> },
    #[error("task `{name}` has no version {version}; versions: {known:?}")]
    UnknownVersion { name: String, version: u32, known: Vec<u32> },
    /// No version of the task is ready, so a request without a version has nothing to run.
    #[error("task `{name}` has no ready version: {states}")]
    NoReadyVersion { name: String, states: String },
    #[error("task `{name}@{version}` failed to load: {reason}")]
    LoadFailed { name: String, version: u32, reason: String },
    /// Loading or draining: retrying later may succeed.
    #[error("task `{name}@{version}` is not ready ({state})")]
    NotReady { name: String, version: u32, state: String },
    #[error("repository I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The repository on disk could not be read (a scan for other replicas' changes).
    #[error("repository scan failed: {0}")]
    Scan(#[from] LoadError),
}

/// What running a batch can hit.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// ONNX Runtime failed a run; its typed error is the source.
    #[error("ONNX Runtime failed: {0}")]
    Runtime(#[from] ort::Error),
    /// A graph's output broke the contract validation checked (rank, shape, device).
    #[error("{0}")]
    Contract(String),
    #[error("the engine panicked while running this batch")]
    Panicked,
    /// The batch this request ran in failed; every request of the batch shares the cause.
    #[error("{0}")]
    Batch(#[source] Arc<EngineError>),
}

impl EngineError {
    /// The cause behind any number of [`EngineError::Batch`] wrappers.
    pub fn root(&self) -> &EngineError {
        match self {
            Self::Batch(inner) => inner.root(),
            other => other,
        }
    }
}

impl ServeError {
    /// Stable label for logs and metrics (`adapterdrop_errors_total{type}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Engine(e) => match e.root() {
                EngineError::Runtime(_) => "runtime",
                _ => "internal",
            },
            other => code_label(other.code()),
        }
    }

    /// The one mapping from every layer's errors to a gRPC status code.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) => Code::NotFound,
            Self::InvalidArgument(_) | Self::Undecodable(_) | Self::TooManyElements(_) => Code::InvalidArgument,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::Cancelled => Code::Cancelled,
            Self::Repository(e) => match e {
                RepositoryError::UnknownTask { .. } | RepositoryError::UnknownVersion { .. } => Code::NotFound,
                RepositoryError::NoReadyVersion { .. } | RepositoryError::LoadFailed { .. } => Code::FailedPrecondition,
                RepositoryError::NotReady { .. } => Code::Unavailable,
                RepositoryError::Io(_) | RepositoryError::Scan(_) => Code::Internal,
            },
            Self::Engine(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

fn code_label(code: Code) -> &'static str {
    match code {
        Code::NotFound => "not_found",
        Code::InvalidArgument => "invalid_argument",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::Unavailable => "unavailable",
        Code::Unauthenticated => "unauthenticated",
        Code::Unimplemented => "unimplemented",
        Code::Cancelled => "cancelled",
        _ => "internal",
    }
}

impl From<ort::Error> for ServeError {
    fn from(e: ort::Error) -> Self {
        Self::Engine(EngineError::Runtime(e))
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

    fn chain(e: &ServeError) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
        std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |c| c.source())
    }

    /// ONNX Runtime's error stays a typed source through the batch fan-out, and maps to INTERNAL
    /// with the `runtime` label.
    #[test]
    fn ort_errors_stay_typed_through_the_batch_wrapper() {
        let shared = Arc::new(EngineError::from(ort::Error::new("bad input shape")));
        let e = ServeError::Engine(EngineError::Batch(shared));
        assert_eq!((e.code(), e.error_type()), (Code::Internal, "runtime"));
        assert_eq!(e.to_string(), "ONNX Runtime failed: bad input shape");
        let ort = chain(&e).find_map(|c| c.downcast_ref::<ort::Error>()).expect("an ort::Error in the chain, not text");
        assert_eq!(ort.message(), "bad input shape");
        let panicked = ServeError::from(EngineError::Panicked);
        assert_eq!((panicked.code(), panicked.error_type()), (Code::Internal, "internal"));
    }

    #[test]
    fn repository_errors_map_to_the_status_a_client_can_act_on() {
        let s = |e: RepositoryError| {
            let e = ServeError::from(e);
            (e.code(), e.error_type())
        };
        let name = || "t".to_string();
        assert_eq!(s(RepositoryError::UnknownTask { name: name(), known: vec![] }), (Code::NotFound, "not_found"));
        assert_eq!(s(RepositoryError::UnknownVersion { name: name(), version: 2, known: vec![1] }), (Code::NotFound, "not_found"));
        assert_eq!(s(RepositoryError::NoReadyVersion { name: name(), states: String::new() }).0, Code::FailedPrecondition);
        assert_eq!(s(RepositoryError::LoadFailed { name: name(), version: 1, reason: "x".into() }).0, Code::FailedPrecondition);
        assert_eq!(s(RepositoryError::NotReady { name: name(), version: 1, state: "Loading".into() }).0, Code::Unavailable);
        assert_eq!(s(RepositoryError::Scan(LoadError::new("tasks", "unreadable"))), (Code::Internal, "internal"));
        let io = ServeError::from(RepositoryError::from(std::io::Error::other("disk full")));
        assert_eq!((io.code(), io.error_type()), (Code::Internal, "internal"));
        assert!(chain(&io).any(|c| c.downcast_ref::<std::io::Error>().is_some()));
        // Status carries the message.
        let status = Status::from(ServeError::from(RepositoryError::UnknownTask { name: "x".into(), known: vec!["a".into()] }));
        assert_eq!((status.code(), status.message()), (Code::NotFound, "task `x` not found; known tasks: [\"a\"]"));
    }
}
