//! Starts the real server binary on an ephemeral port against the exported test repository.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use adapterdrop_serve::proto::inference_client::InferenceClient;
use tonic::transport::Channel;

pub mod banks;
pub mod breadth;
pub mod certs;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Built by `make test-repo` (tools/make_test_repo.py) before `cargo test` runs.
pub fn test_repo() -> PathBuf {
    let p = std::env::var_os("ADAPTERDROP_TEST_REPO").map(PathBuf::from).unwrap_or_else(|| root().join("build/test-repo"));
    assert!(p.join("expected.json").is_file(), "test repository {} is missing: run `make test-repo` first", p.display());
    p
}

pub fn ort_library() -> PathBuf {
    let p = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or_else(|| root().join("build/lib/libonnxruntime.so"));
    assert!(p.is_file(), "ONNX Runtime library {} is missing: run `make setup` first", p.display());
    p
}

/// The server under test; `ADAPTERDROP_SERVER_BIN` overrides it (the GPU check runs prebuilt binaries elsewhere).
pub fn server_binary() -> PathBuf {
    std::env::var_os("ADAPTERDROP_SERVER_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_adapterdrop-serve")))
}

/// Checkpoints and adapters saved by the AdapterHub `adapters` library, with its own logits
/// (tools/train/make_adapterhub_fixtures.py, `make adapterhub-fixtures`).
pub fn adapterhub_fixtures() -> PathBuf {
    root().join("tests/fixtures/adapterhub-tiny")
}

pub struct TestServer {
    child: Child,
    pub addr: String,
    /// `host:port` of the Prometheus endpoint.
    pub metrics_addr: String,
    pub logs: mpsc::Receiver<String>,
}

/// The server binary on `repo`, every port ephemeral on 127.0.0.1, plain-text logs on piped
/// stdout and stderr, and an environment with nothing but what a test sets.
pub fn server_command(repo: &Path) -> Command {
    let mut cmd = Command::new(server_binary());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("ORT_DYLIB_PATH", ort_library())
        .env("ADAPTERDROP__SERVER__LISTEN", "127.0.0.1:0")
        .env("ADAPTERDROP__METRICS__LISTEN", "127.0.0.1:0")
        .env("ADAPTERDROP__ADMIN__LISTEN", "127.0.0.1:0")
        .env("ADAPTERDROP__REPOSITORY__PATH", repo)
        .env("ADAPTERDROP__LOG__FORMAT", "text")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

impl TestServer {
    /// Starts the server on the test repository with extra `ADAPTERDROP__*` settings.
    pub fn start(env: &[(&str, &str)]) -> Self {
        Self::start_on(&test_repo(), env)
    }

    pub fn start_on(repo: &Path, env: &[(&str, &str)]) -> Self {
        let mut cmd = server_command(repo);
        cmd.env("ADAPTERDROP__RUNTIME__INTRA_THREADS", "2");
        // `make gpu-check` runs the same tests on the CUDA execution provider.
        for (k, v) in std::env::vars_os() {
            let key = k.to_string_lossy();
            if key.starts_with("ADAPTERDROP__RUNTIME__") || key == "LD_LIBRARY_PATH" {
                cmd.env(&k, v);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn server");
        let (tx, logs) = mpsc::channel();
        for stream in [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        // Only the readers hold senders now: a server that dies early fails the test at once.
        drop(tx);
        let mut seen = Vec::new();
        let mut metrics_addr = String::new();
        loop {
            match logs.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    if let Some(m) = line.split("metrics_addr=").nth(1).and_then(|r| r.split_whitespace().next()) {
                        metrics_addr = m.to_string();
                    }
                    let addr = line.split("listening addr=").nth(1).and_then(|r| r.split_whitespace().next());
                    if let Some(addr) = addr {
                        return Self { child, addr: addr.to_string(), metrics_addr, logs };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("server did not start; output:\n{}", seen.join("\n"));
                }
            }
        }
    }

    pub async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::connect(format!("http://{}", self.addr)).await.expect("connect").max_decoding_message_size(64 << 20)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.expect("connect")
    }

    /// Everything the server logged so far.
    pub fn drain_logs(&self) -> Vec<String> {
        self.logs.try_iter().collect()
    }

    /// Sends SIGTERM, as Kubernetes does before stopping a pod.
    pub fn terminate(&self) {
        let ok = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().expect("kill").success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits up to `limit` for the process to exit; its exit status, or None if still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// The admin port's address, from the `admin service up admin=` log line (logged right after
    /// `listening`).
    pub fn admin_addr(&self) -> String {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while std::time::Instant::now() < end {
            if let Ok(line) = self.logs.recv_timeout(Duration::from_millis(100)) {
                if let Some(addr) = line.split("admin service up admin=").nth(1).and_then(|r| r.split_whitespace().next()) {
                    return addr.to_string();
                }
                seen.push(line);
            }
        }
        panic!("the server did not log `admin service up admin=`; output:\n{}", seen.join("\n"));
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crashed or OOM-killed pod: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion (for start-up failures) and returns (exit success, output).
pub fn run_to_exit(env: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = Command::new(server_binary());
    cmd.env_clear()
        .env("ADAPTERDROP__SERVER__LISTEN", "127.0.0.1:0")
        .env("ADAPTERDROP__METRICS__LISTEN", "127.0.0.1:0")
        .env("ADAPTERDROP__ADMIN__LISTEN", "127.0.0.1:0")
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run server");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Copies a directory tree (test repositories are small).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() { copy_dir(&e.path(), &target) } else { std::fs::copy(e.path(), &target).map(|_| ()).unwrap() }
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch: {a:?} vs {b:?}");
    a.iter().zip(b).map(|(x, y)| (*x as f64 - y).abs()).fold(0.0, f64::max)
}

/// A plain HTTP/1.1 GET of the metrics port's `/metrics`; the body.
pub fn scrape(metrics_addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(metrics_addr).expect("connect to metrics port");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {metrics_addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
}

/// Sum of every sample of metric `name` whose labels contain `label` (e.g. `api="native"`).
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// CPU seconds (user + system) the process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start at state; utime, stime are 14, 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// Resident memory of the process in bytes, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).expect("VmRSS");
    kb * 1024
}

/// One task at drop depth `n` on `inputs`: the logits per sequence, after checking that exactly
/// the first `n` layers were dropped (the exactness suites compare these with the library's).
pub async fn infer_logits(
    server: &TestServer,
    task: &str,
    n: u32,
    inputs: adapterdrop_serve::proto::infer_request::Inputs,
) -> Vec<Vec<f32>> {
    use adapterdrop_serve::proto::{InferRequest, TaskRef};
    let mut client = server.client().await;
    let req = InferRequest {
        tasks: vec![TaskRef { name: task.into(), version: None, drop_first: Some(n), ..Default::default() }],
        inputs: Some(inputs),
        truncate: false,
        return_fusion_weights: false,
        id: String::new(),
        ..Default::default()
    };
    let resp = client.infer(req).await.unwrap_or_else(|s| panic!("{task} n={n}: {s}")).into_inner();
    assert_eq!(resp.results.len(), 1, "{task} n={n}");
    assert_eq!(resp.results[0].dropped_layers, (0..n).collect::<Vec<_>>(), "{task} n={n}");
    resp.results[0].sequences.iter().map(|s| s.logits.clone()).collect()
}
