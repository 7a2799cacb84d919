//! Bidirectional inference streams (InferStream, ModelStreamInfer). Each message is worked on
//! concurrently, so one stream's requests batch together, but only `server.max_stream_in_flight`
//! at a time: at the bound the stream is not read, and HTTP/2 flow control holds back a client
//! that sends faster than it reads. A client that goes away cancels its queued work; a message
//! that does not decode ends the stream with an error status; shutdown ends idle streams.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status, Streaming};

/// How streams behave; one per server, cloned into each stream.
#[derive(Clone)]
pub struct StreamPolicy {
    /// Messages of one stream being worked on or answered and not yet taken by the transport.
    pub max_in_flight: usize,
    /// Turns true when shutdown starts: streams read no more, finish what they hold, and end.
    pub stopping: watch::Receiver<bool>,
}

impl StreamPolicy {
    /// At least one message in flight, whatever the setting says.
    pub fn new(max_in_flight: usize, stopping: watch::Receiver<bool>) -> Self {
        Self { max_in_flight: max_in_flight.max(1), stopping }
    }
}

pub type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Answers every message of `inbound` with `handle`, under `policy`.
pub fn serve<Req, Resp, F, Fut>(inbound: Streaming<Req>, policy: &StreamPolicy, handle: F) -> Answers<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: FnMut(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let n = policy.max_in_flight.max(1);
    // Each answer carries its slot until the transport takes it.
    let (tx, rx) = mpsc::channel::<(Result<Resp, Status>, Option<OwnedSemaphorePermit>)>(n);
    tokio::spawn(pump(inbound, tx, n, policy.stopping.clone(), handle));
    Box::pin(ReceiverStream::new(rx).map(|(answer, _slot)| answer))
}

type Out<Resp> = mpsc::Sender<(Result<Resp, Status>, Option<OwnedSemaphorePermit>)>;

async fn pump<Req, Resp, F, Fut>(mut inbound: Streaming<Req>, tx: Out<Resp>, n: usize, mut stopping: watch::Receiver<bool>, mut handle: F)
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: FnMut(Req) -> Fut + Send + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(n));
    let mut running = JoinSet::new();
    let mut read = 0usize;
    let end = loop {
        let slot = tokio::select! {
            biased;
            _ = tx.closed() => return running.abort_all(),
            _ = stop(&mut stopping) => break Some(shutting_down()),
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let next = tokio::select! {
            biased;
            _ = tx.closed() => return running.abort_all(),
            _ = stop(&mut stopping) => break Some(shutting_down()),
            next = inbound.message() => next,
        };
        match next {
            Ok(Some(req)) => {
                read += 1;
                let work = handle(req);
                let tx = tx.clone();
                running.spawn(async move {
                    let answer = work.await;
                    let _ = tx.send((Ok(answer), Some(slot))).await;
                });
                while running.try_join_next().is_some() {}
            }
            Ok(None) => break None,
            Err(status) => break Some(undecodable(status, read)),
        }
    };
    // Answer the messages already read first, unless the client goes away meanwhile (then its
    // work is cancelled: the queue drops requests whose caller is gone).
    loop {
        tokio::select! {
            biased;
            _ = tx.closed() => return running.abort_all(),
            done = running.join_next() => if done.is_none() { break },
        }
    }
    if let Some(status) = end {
        let _ = tx.send((Err(status), None)).await;
    }
}

/// Resolves once shutdown starts; never when the server has no shutdown signal.
async fn stop(stopping: &mut watch::Receiver<bool>) {
    if stopping.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down: this stream reads no more messages (those already read were answered); reconnect")
}

/// A message the transport could not decode is the client's fault: INVALID_ARGUMENT (the codec
/// says so already; tonic's own framing errors say INTERNAL), with where the stream stopped, and
/// never a silent OK.
fn undecodable(status: Status, read: usize) -> Status {
    if matches!(status.code(), Code::Internal | Code::InvalidArgument) {
        Status::invalid_argument(format!(
            "stream message {read} could not be decoded ({}); the stream ends here, the {read} messages before it were answered",
            status.message()
        ))
    } else {
        status
    }
}
