//! Request ids: every gRPC call gets one (the client's `x-request-id` when it sends a sane one),
//! it is logged on the request's span and returned in the response headers, so a client-side
//! report can be matched with server logs.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use http::HeaderValue;
use tower::{Layer, Service};

pub const HEADER: &str = "x-request-id";

/// The id of a request as the handler sees it (the layer has already filled it in).
pub fn of(metadata: &tonic::metadata::MetadataMap) -> String {
    metadata.get(HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// A client id is kept when it is short printable ASCII; anything else is replaced.
fn acceptable(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// Unique within the process and unlikely to repeat across restarts: start time + counter.
fn generate() -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or_default()
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    HeaderValue::from_str(&format!("{epoch:x}-{n:x}")).expect("hex is a valid header value")
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestId { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for RequestId<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let id = match req.headers().get(HEADER) {
            Some(v) if acceptable(v) => v.clone(),
            _ => generate(),
        };
        req.headers_mut().insert(HEADER, id.clone());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            resp.headers_mut().insert(HEADER, id);
            Ok(resp)
        })
    }
}
