//! The thread that creates ONNX Runtime sessions for run-time task loads (polls, reloads of
//! failed versions), one per [`Registrar`]. Uploads are validated on a small pool of such threads
//! ([`LoaderPool`]), so that one slow upload holds up no other change.
//!
//! Loads from the repository are serial anyway (mutation lock); one long-lived thread keeps the allocations
//! of every load in one malloc arena, so register/unregister cycles do not fragment memory across
//! the blocking pool's threads (measured: resident memory stays flat; with the blocking pool it
//! crept up by ~100 KiB per cycle). The thread ends when the last clone of its owner is dropped.
//!
//! [`Registrar`]: super::Registrar

use std::sync::{Arc, Mutex, mpsc};

use crate::error::ServeError;

type Job = Box<dyn FnOnce() + Send>;

/// Cheap to clone: clones share one thread.
#[derive(Clone)]
pub struct Loader {
    jobs: Arc<Mutex<mpsc::Sender<Job>>>,
}

impl Loader {
    /// Starts the thread.
    pub fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("task-loader".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawn task loader thread");
        Self { jobs: Arc::new(Mutex::new(tx)) }
    }

    /// Runs `f` on the loader thread and waits for it without blocking the reactor; a panic in
    /// `f` is an error, and the thread lives on.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T, ServeError> + Send + 'static) -> Result<T, ServeError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(ServeError::Internal("loading the task panicked".into())));
            let _ = reply.send(result);
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| ServeError::Internal("task loader thread is gone".into()))?;
        answer.await.map_err(|_| ServeError::Internal("task loader dropped the job".into()))?
    }
}

/// A fixed set of loader threads for upload validation: at most `n` jobs at once, each on a
/// long-lived thread of its own. Not tokio's blocking pool: its changing threads each grow a malloc
/// arena, and the register/unregister soak test saw resident memory creep with them.
pub struct LoaderPool {
    free: Arc<Mutex<Vec<Loader>>>,
    permits: tokio::sync::Semaphore,
}

/// Gives its loader back to the pool, also when the job's caller goes away mid-way.
struct Lent {
    loader: Option<Loader>,
    free: Arc<Mutex<Vec<Loader>>>,
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(l) = self.loader.take() {
            self.free.lock().unwrap_or_else(|p| p.into_inner()).push(l);
        }
    }
}

impl LoaderPool {
    pub fn start(n: usize) -> Self {
        Self { free: Arc::new(Mutex::new((0..n).map(|_| Loader::start()).collect())), permits: tokio::sync::Semaphore::new(n) }
    }

    /// Waits for a free thread, then runs `f` there as [`Loader::run`] does.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T, ServeError> + Send + 'static) -> Result<T, ServeError> {
        let _permit = self.permits.acquire().await.map_err(|_| ServeError::Unavailable("the server is shutting down".into()))?;
        let loader = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop().expect("a permit guarantees a free loader");
        let lent = Lent { loader: Some(loader), free: self.free.clone() };
        lent.loader.as_ref().expect("lent until dropped").run(f).await
    }
}
