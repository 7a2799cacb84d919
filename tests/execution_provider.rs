//! The execution provider is chosen explicitly: asking for CUDA from a library without it is a
//! start-up error naming the fix, never a silent fall-back to the CPU.

mod common;

use common::{ort_library, run_to_exit, test_repo};

fn run(provider: &str) -> (bool, String) {
    let (ort, repo) = (ort_library(), test_repo());
    run_to_exit(&[
        ("ORT_DYLIB_PATH", ort.to_str().unwrap()),
        ("ADAPTERDROP__REPOSITORY__PATH", repo.to_str().unwrap()),
        ("ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER", provider),
        // Ends a successful start at once: the port is taken by nothing, but an invalid address stops it.
        ("ADAPTERDROP__SERVER__LISTEN", "256.0.0.1:0"),
    ])
}

#[test]
fn cuda_without_a_cuda_library_is_a_start_up_error() {
    if std::env::var("ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER").as_deref() == Ok("cuda") {
        eprintln!("skipped: running under `make gpu-check` with the CUDA library");
        return;
    }
    let (ok, out) = run("cuda");
    assert!(!ok, "server started on CUDA with the CPU-only library:\n{out}");
    assert!(out.contains("has no CUDA execution provider") && out.contains("onnxruntime-gpu==1.31.1"), "{out}");
}

#[test]
fn unknown_execution_provider_is_refused() {
    let (ok, out) = run("tpu");
    assert!(!ok && out.contains("runtime.execution_provider is `tpu`; expected `cpu` or `cuda`"), "{out}");
}
