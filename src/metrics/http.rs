//! The metrics port: plain HTTP/1.1, `GET /metrics` only. Kept off the gRPC port so scrapers and
//! network policies can treat it separately.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::context::Context;
use crate::repository::Registry;

/// Serves until the task is dropped (the server aborts it at shutdown).
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, ctx: Arc<Context>) {
    loop {
        let (stream, peer) = match accept(&listener).await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "metrics port: accept failed");
                continue;
            }
        };
        let (registry, ctx) = (registry.clone(), ctx.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, registry.clone(), ctx.clone()));
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// Accepts one connection, with TCP_NODELAY so that small answers are not held back by Nagle.
async fn accept(listener: &TcpListener) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    let (stream, peer) = listener.accept().await?;
    stream.set_nodelay(true)?;
    Ok((stream, peer))
}

async fn answer(req: Request<Incoming>, registry: Arc<Registry>, ctx: Arc<Context>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            // Rendering walks the registry; keep it off the reactor threads.
            let text = tokio::task::spawn_blocking(move || ctx.metrics.render(&registry)).await.unwrap_or_default();
            reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text)
        }
        (_, "/metrics") => reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "metrics are at /metrics\n".into()),
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = super::accept(&listener).await.unwrap();
        assert!(stream.nodelay().unwrap());
    }
}
