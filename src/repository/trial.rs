//! The trial run of a newly uploaded task: every graph the task would run is executed once on a
//! small deterministic input, and must produce finite outputs of the contracted shape. This catches
//! graphs whose declared I/O matches the contract but whose weights do not (a MatMul of the wrong
//! width fails only when it runs). Only the task's own graphs run: the backbone's sessions, which
//! the engine thread is using, are not touched, so a trial run never stalls inference.

use ndarray::{Array3, ArrayD, ArrayViewD};
use ort::value::TensorRef;

use super::manifest::HeadKind;
use super::task::Task;
use crate::error::LoadError;
use crate::runtime::Graph;

const ROWS: usize = 2;
const TOKENS: usize = 5;

pub fn trial_run(task: &Task) -> Result<(), LoadError> {
    let hidden = task.backbone.manifest.hidden_size;
    let x = Array3::from_shape_fn((ROWS, TOKENS, hidden), |(i, j, k)| ((i * 131 + j * 17 + k) as f32 * 0.37).sin());
    let h = Array3::from_shape_fn((ROWS, TOKENS, hidden), |(i, j, k)| ((i * 71 + j * 13 + k) as f32 * 0.21).cos() * 0.5);
    for graph in task.slots.values() {
        let y = run(graph, &[("h", &h), ("x", &x)], "y")?;
        check(graph.file(), "y", &y.view(), &[ROWS, TOKENS, hidden])?;
    }
    let width = match task.manifest.head.kind {
        HeadKind::Classification => task.manifest.head.labels.len(),
        HeadKind::Regression => 1,
    };
    match (&task.head, &task.adapterhub) {
        (Some(head), _) => {
            let logits = run(head, &[("hidden", &x)], "logits")?;
            check(head.file(), "logits", &logits.view(), &[ROWS, width])
        }
        (None, Some(w)) => {
            let logits = crate::engine::heads::head_logits_on_rows(&w.head, x.view(), &[0, 1]);
            check("adapterhub/model_head.safetensors", "host head logits", &logits.view().into_dyn(), &[ROWS, width])
        }
        (None, None) => Err(LoadError::new("task.json", "the task has neither a head graph nor AdapterHub weights")),
    }
}

fn run(graph: &Graph, inputs: &[(&'static str, &Array3<f32>)], output: &'static str) -> Result<ArrayD<f32>, LoadError> {
    let fail = |e: ort::Error| LoadError::new(graph.file(), format!("trial run on a dummy input failed: {e}"));
    let mut values = Vec::with_capacity(inputs.len());
    for (name, a) in inputs {
        values.push((*name, TensorRef::from_array_view(a.view()).map_err(fail)?.into()));
    }
    graph.run(values, |outs| Ok(outs[output].try_extract_array::<f32>()?.to_owned())).map_err(fail)
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
