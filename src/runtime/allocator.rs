//! One CPU memory arena for every session, registered on the environment.
//!
//! By default each ONNX Runtime session owns an arena, so the ~30 segment and slot sessions of a
//! backbone (plus every task's adapter sessions) each keep their own intermediate buffers: the
//! engine cycles through far more memory than one model would, and buffers are cache-cold when a
//! graph starts. With one shared arena, consecutive graphs reuse the same blocks, as inside a
//! single fused graph. Measured on MiniLM, B = 8, T = 128 (tools/experiments/segment_floor.py):
//! segmented 1.25x the fused model with per-session arenas, 1.07x with the shared one.

use ort::AsPointer;
use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};

/// Registers the shared CPU arena (ORT's default arena settings) on `env`. Sessions use it when
/// built with `with_env_allocators()`. Registering again on the same environment is harmless.
pub fn register_shared_cpu_arena(env: &Environment) -> ort::Result<()> {
    let info = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Arena, MemoryType::Default)?;
    let api = ort::api();
    // SAFETY: `env` and `info` are live ORT objects for the duration of the call; a null arena
    // config asks for the defaults. ORT copies what it keeps.
    let status = unsafe { (api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info.ptr(), std::ptr::null()) };
    // SAFETY: `status` was just returned by ORT and is consumed here exactly once.
    match unsafe { ort::Error::result_from_status(status) } {
        Err(e) if e.message().contains("already") => Ok(()),
        other => other,
    }
}
