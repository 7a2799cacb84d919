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

/// Every enum setting refuses an unknown value at start-up (exit code 2), naming the key and the
/// allowed values, instead of falling back silently.
#[test]
fn unknown_enum_settings_stop_start_up_naming_key_and_choices() {
    let (ok, out) = run("tpu");
    assert!(!ok && out.contains("runtime.execution_provider") && out.contains("`cpu`, `cuda`"), "{out}");
    let repo = test_repo();
    for (var, value, key, allowed) in [
        ("ADAPTERDROP__RUNTIME__OPTIMIZATION_LEVEL", "fast", "runtime.optimization_level", "`disable`, `basic`, `extended`, `all`"),
        ("ADAPTERDROP__LOG__FORMAT", "xml", "log.format", "`text`, `json`"),
    ] {
        let mut cmd = std::process::Command::new(common::server_binary());
        // An address that cannot be bound: a server that accepted the value exits 1, not 2.
        cmd.env_clear()
            .env("ORT_DYLIB_PATH", ort_library())
            .env("ADAPTERDROP__REPOSITORY__PATH", &repo)
            .env("ADAPTERDROP__SERVER__LISTEN", "256.0.0.1:0")
            .env("ADAPTERDROP__METRICS__LISTEN", "")
            .env("ADAPTERDROP__ADMIN__LISTEN", "")
            .env(var, value);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}={value} must stop start-up: {text}");
        assert!(text.contains("invalid configuration") && text.contains(key) && text.contains(allowed) && text.contains(value), "{text}");
    }
}
