//! The trial run of a newly uploaded task: every graph the task holds (adapter slots, their
//! optional output graphs, every fused adapter and fusion graph, the head) is executed once on a
//! small deterministic input, and must produce finite outputs of the contracted shape. This catches
//! graphs whose declared I/O matches the contract but whose weights do not (a MatMul of the wrong
//! width fails only when it runs). Only the task's own graphs run: the backbone's sessions, which
//! the engine thread is using, are not touched, so a trial run never stalls inference.
//!
//! The run is bounded in time: a watchdog sets ONNX Runtime's terminate flag when
//! `admin.trial_timeout_ms` has passed (memory is bounded before, by `graph_check`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ndarray::{Array3, ArrayD, ArrayViewD, Axis};
use ort::session::RunOptions;
use ort::value::TensorRef;

use super::task::Task;
use crate::error::LoadError;
use crate::runtime::Graph;

const ROWS: usize = 2;
/// Where a weights-only task's head comes from, for messages.
const HOST_HEAD_FILE: &str = "adapterhub/model_head.safetensors";
const TOKENS: usize = 5;

pub fn trial_run(task: &Task, timeout: Duration) -> Result<(), LoadError> {
    let head_file = task.head.as_ref().map_or(HOST_HEAD_FILE, |g| g.file());
    let watchdog = Watchdog::start(timeout).map_err(|e| LoadError::new(head_file, format!("trial run: {e}")))?;
    let trial = Trial { watchdog: &watchdog, timeout };
    let hidden = task.backbone.manifest.hidden_size;
    let x = Array3::from_shape_fn((ROWS, TOKENS, hidden), |(i, j, k)| ((i * 131 + j * 17 + k) as f32 * 0.37).sin()).into_dyn();
    let h = Array3::from_shape_fn((ROWS, TOKENS, hidden), |(i, j, k)| ((i * 71 + j * 13 + k) as f32 * 0.21).cos() * 0.5).into_dyn();
    let bth = [ROWS, TOKENS, hidden];
    let hx = || [("h", h.view()), ("x", x.view())];
    for graph in task.slots.values() {
        trial.run(graph, &hx(), &[("y", &bth)])?;
    }
    for graph in task.up.values() {
        trial.run(graph, &hx(), &[("up", &bth)])?;
    }
    for slot in task.fusion.values() {
        let mut ups = Vec::with_capacity(slot.adapters.len());
        for a in &slot.adapters {
            ups.extend(trial.run(&a.graph, &hx(), &[("up", &bth)])?);
        }
        let views: Vec<ArrayViewD<f32>> = ups.iter().map(|u| u.view()).collect();
        let up = ndarray::stack(Axis(2), &views).map_err(|e| LoadError::new(slot.graph.file(), format!("trial run: {e}")))?;
        let up = up.as_standard_layout().into_owned();
        let inputs = [("h", h.view()), ("x", x.view()), ("up", up.view())];
        trial.run(&slot.graph, &inputs, &[("y", &bth), ("alpha", &[ROWS, TOKENS, slot.adapters.len()])])?;
    }
    let width = task.manifest.head.width();
    match (&task.head, &task.adapterhub) {
        (Some(head), _) => trial.run(head, &[("hidden", x.view())], &[("logits", &[ROWS, width])]).map(drop),
        // A weights-only task's head runs on the host, from its AdapterHub weights.
        (None, Some(w)) => {
            let x3 = x.view().into_dimensionality::<ndarray::Ix3>().map_err(|e| LoadError::new(HOST_HEAD_FILE, e.to_string()))?;
            let logits = crate::engine::heads::head_logits_on_rows(&w.head, x3, &[0, 1]);
            check(HOST_HEAD_FILE, "host head logits", &logits.view().into_dyn(), &[ROWS, width])
        }
        (None, None) => Err(LoadError::new("task.json", "the task has neither a head graph nor AdapterHub weights")),
    }
}

struct Trial<'a> {
    watchdog: &'a Watchdog,
    timeout: Duration,
}

impl Trial<'_> {
    /// Runs `graph` once and checks that each named output has its shape and finite values.
    fn run(
        &self,
        graph: &Graph,
        inputs: &[(&'static str, ArrayViewD<f32>)],
        outputs: &[(&'static str, &[usize])],
    ) -> Result<Vec<ArrayD<f32>>, LoadError> {
        let fail = |e: ort::Error| {
            if self.watchdog.fired() {
                LoadError::new(
                    graph.file(),
                    format!("trial run stopped after {} ms (admin.trial_timeout_ms): the graph runs too long", self.timeout.as_millis()),
                )
            } else {
                LoadError::new(graph.file(), format!("trial run on a dummy input failed: {e}"))
            }
        };
        let mut values = Vec::with_capacity(inputs.len());
        for (name, a) in inputs {
            values.push((*name, TensorRef::from_array_view(a.view()).map_err(fail)?.into()));
        }
        let read = |outs: ort::session::SessionOutputs<'_>| {
            outputs.iter().map(|(name, _)| Ok(outs[*name].try_extract_array::<f32>()?.to_owned())).collect::<ort::Result<Vec<_>>>()
        };
        let values = graph.run_with_options(values, &self.watchdog.options, read).map_err(fail)?;
        for ((name, shape), value) in outputs.iter().zip(&values) {
            check(graph.file(), name, &value.view(), shape)?;
        }
        Ok(values)
    }
}

fn check(file: &str, name: &str, value: &ArrayViewD<'_, f32>, shape: &[usize]) -> Result<(), LoadError> {
    if value.shape() != shape {
        return Err(LoadError::new(file, format!("trial run: output `{name}` has shape {:?}, expected {shape:?}", value.shape())));
    }
    if value.iter().any(|v| !v.is_finite()) {
        return Err(LoadError::new(file, format!("trial run: output `{name}` has non-finite values (NaN or inf)")));
    }
    Ok(())
}

/// Sets the run options' terminate flag once `timeout` has passed, unless dropped first.
struct Watchdog {
    options: Arc<RunOptions>,
    fired: Arc<AtomicBool>,
    _stop: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    fn start(timeout: Duration) -> ort::Result<Self> {
        let options = Arc::new(RunOptions::new()?);
        let fired = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (opts, flag) = (options.clone(), fired.clone());
        std::thread::Builder::new()
            .name("trial-watchdog".into())
            .spawn(move || {
                // Disconnected (the trial finished) or timed out.
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(timeout) {
                    flag.store(true, Ordering::SeqCst);
                    if let Err(e) = opts.terminate() {
                        tracing::warn!(error = %e, "cannot stop an over-long trial run");
                    }
                }
            })
            .map_err(|e| ort::Error::new(format!("cannot start the trial watchdog: {e}")))?;
        Ok(Self { options, fired, _stop: stop })
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}
