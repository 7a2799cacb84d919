//! Thin glue between ndarray buffers and ONNX Runtime graph runs.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis, Ix3};
use ort::session::SessionInputValue;
use ort::value::TensorRef;

use crate::error::ServeError;
use crate::runtime::Graph;

/// Wraps a standard-layout view without copying.
pub fn f32_input<'a>(a: &'a ArrayView3<'a, f32>) -> Result<SessionInputValue<'a>, ServeError> {
    Ok(TensorRef::from_array_view(a.view())?.into())
}

pub fn i64_input<'a>(a: &'a ArrayView2<'a, i64>) -> Result<SessionInputValue<'a>, ServeError> {
    Ok(TensorRef::from_array_view(a.view())?.into())
}

/// Runs `graph` and copies its single rank-3 f32 output `name` out of ORT's buffer.
pub fn run3(graph: &Graph, inputs: Vec<(&'static str, SessionInputValue<'_>)>, name: &'static str) -> Result<Array3<f32>, ServeError> {
    let out = graph.run(inputs, |outputs| {
        let view = outputs[name].try_extract_array::<f32>()?;
        Ok(view.to_owned())
    })?;
    out.into_dimensionality::<Ix3>()
        .map_err(|e| ServeError::Internal(format!("{}: output `{name}` is not rank 3: {e}", graph.file())))
}

/// Runs a head graph; returns `[rows, labels]` logits.
pub fn run_head(graph: &Graph, hidden: &Array3<f32>) -> Result<Array2<f32>, ServeError> {
    let view = hidden.view();
    let out = graph.run(vec![("hidden", f32_input(&view)?)], |outputs| Ok(outputs["logits"].try_extract_array::<f32>()?.to_owned()))?;
    out.into_dimensionality()
        .map_err(|e| ServeError::Internal(format!("{}: logits are not rank 2: {e}", graph.file())))
}

/// Runs a slot graph `(h, x) -> y`, on the given rows only (all rows when `rows` is None).
pub fn run_slot(graph: &Graph, h: &Array3<f32>, x: &Array3<f32>, rows: Option<&[usize]>) -> Result<Array3<f32>, ServeError> {
    match rows {
        None => {
            let (hv, xv) = (h.view(), x.view());
            run3(graph, vec![("h", f32_input(&hv)?), ("x", f32_input(&xv)?)], "y")
        }
        Some(rows) => {
            let (hs, xs) = (h.select(Axis(0), rows), x.select(Axis(0), rows));
            let (hv, xv) = (hs.view(), xs.view());
            run3(graph, vec![("h", f32_input(&hv)?), ("x", f32_input(&xv)?)], "y")
        }
    }
}
