//! One CUDA stream for every CUDA session of the process (issue 12 item 6: all layer runs on one
//! stream, no host synchronisation between layers).
//!
//! Each ONNX Runtime CUDA session otherwise creates its own stream. Skipping the end-of-run device
//! synchronisation of a layer (`RunOptions::disable_device_sync`) is only safe when the next layer
//! queues behind it on the same stream; on separate streams it would read a buffer still being
//! written. The stream is created once through the CUDA runtime library that the onnxruntime-gpu
//! wheel's CUDA dependencies put on `LD_LIBRARY_PATH`; where it cannot be, sessions keep their
//! own streams and the IoBinding runner synchronises after every layer (slower, never wrong).

use std::sync::OnceLock;

/// `cudaStreamNonBlocking`: no implicit synchronisation with the legacy default stream.
const NON_BLOCKING: u32 = 1;

/// Names the CUDA 13 (and older) runtime is found under.
const CUDART: &[&str] = &["libcudart.so.13", "libcudart.so.12", "libcudart.so"];

/// The shared stream (its `cudaStream_t` as an address), created on first use; `None` when the CUDA
/// runtime library is not found or refuses (logged once).
pub fn shared() -> Option<usize> {
    static STREAM: OnceLock<Option<usize>> = OnceLock::new();
    *STREAM.get_or_init(|| match create() {
        Ok(stream) => {
            tracing::info!(stream = format!("{stream:#x}"), "one CUDA stream shared by every session");
            Some(stream)
        }
        Err(reason) => {
            tracing::warn!(%reason, "no shared CUDA stream: sessions keep their own, and layers synchronise after every run");
            None
        }
    })
}

fn create() -> Result<usize, String> {
    let mut tried = Vec::new();
    for &name in CUDART {
        // SAFETY: loading the CUDA runtime runs only its static initialisers; the symbol has the
        // documented signature `cudaError_t cudaStreamCreateWithFlags(cudaStream_t*, unsigned)`.
        let made = unsafe {
            libloading::Library::new(name).map_err(|e| e.to_string()).and_then(|lib| {
                let f: libloading::Symbol<unsafe extern "C" fn(*mut *mut std::ffi::c_void, u32) -> i32> =
                    lib.get(b"cudaStreamCreateWithFlags").map_err(|e| e.to_string())?;
                let mut stream = std::ptr::null_mut();
                let code = f(&mut stream, NON_BLOCKING);
                // The stream lives as long as the process: keep the library loaded.
                std::mem::forget(lib);
                if code == 0 && !stream.is_null() { Ok(stream as usize) } else { Err(format!("cudaStreamCreateWithFlags returned {code}")) }
            })
        };
        match made {
            Ok(stream) => return Ok(stream),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(tried.join("; "))
}
