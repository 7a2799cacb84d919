//! Thin glue between ndarray buffers and ONNX Runtime graph runs.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, ArrayViewD, Axis, Ix3};
use ort::memory::AllocationDevice;
use ort::session::SessionInputValue;
use ort::value::{DynValue, TensorRef, TensorValueType};

use crate::error::EngineError;
use crate::runtime::Graph;

/// Hidden states `[rows, tokens, hidden]`: an ndarray on the host, or the tensor a graph returned,
/// left where ONNX Runtime put it (host memory for CPU sessions, the GPU for CUDA ones) and fed to the
/// next graph without a copy. Only row splits and the heads need an ndarray.
pub enum Hidden {
    Host(Array3<f32>),
    Ort(DynValue),
}

impl Hidden {
    pub fn rows(&self) -> Result<usize, EngineError> {
        Ok(match self {
            Self::Host(a) => a.len_of(Axis(0)),
            Self::Ort(v) => match v.dtype() {
                ort::value::ValueType::Tensor { shape, .. } if !shape.is_empty() => shape[0] as usize,
                other => return Err(EngineError::Contract(format!("device hidden states are {other:?}, not a tensor"))),
            },
        })
    }

    /// The states in place, for host memory (ndarrays and CPU sessions' outputs); GPU states
    /// cannot be read in place.
    pub fn view(&self) -> Result<ArrayView3<'_, f32>, EngineError> {
        match self {
            Self::Host(a) => Ok(a.view()),
            Self::Ort(v) => rank3(v.try_extract_array::<f32>()?),
        }
    }

    /// A graph input reading these states where they are, without copying.
    pub fn input(&self) -> Result<SessionInputValue<'_>, EngineError> {
        Ok(match self {
            Self::Host(a) => TensorRef::from_array_view(a.view())?.into(),
            Self::Ort(v) => v.into(),
        })
    }

    /// The states on the host (a device-to-host copy for GPU states).
    pub fn into_host(self) -> Result<Array3<f32>, EngineError> {
        match self {
            Self::Host(a) => Ok(a),
            Self::Ort(v) => {
                // Host memory (CPU sessions) reads directly; GPU memory is copied down first.
                if let Ok(view) = v.try_extract_array::<f32>() {
                    return Ok(rank3(view)?.to_owned());
                }
                let host = v.downcast::<TensorValueType<f32>>()?.to(AllocationDevice::CPU, 0)?;
                Ok(rank3(host.extract_array())?.to_owned())
            }
        }
    }
}

fn rank3(a: ArrayViewD<'_, f32>) -> Result<ArrayView3<'_, f32>, EngineError> {
    a.into_dimensionality::<Ix3>().map_err(|e| EngineError::Contract(format!("hidden states are not rank 3: {e}")))
}

/// Runs `graph` and keeps its output `name` as ONNX Runtime returned it, on the graph's device.
pub fn run_hidden(graph: &Graph, inputs: Vec<(&'static str, SessionInputValue<'_>)>, name: &'static str) -> Result<Hidden, EngineError> {
    Ok(Hidden::Ort(graph.run_on_device(inputs, name)?))
}

/// Wraps a standard-layout view without copying.
pub fn f32_input<'a>(a: &'a ArrayView3<'a, f32>) -> Result<SessionInputValue<'a>, EngineError> {
    Ok(TensorRef::from_array_view(a.view())?.into())
}

pub fn i64_input<'a>(a: &'a ArrayView2<'a, i64>) -> Result<SessionInputValue<'a>, EngineError> {
    Ok(TensorRef::from_array_view(a.view())?.into())
}

/// Runs `graph` and copies its single rank-3 f32 output `name` out of ORT's buffer.
pub fn run3(graph: &Graph, inputs: Vec<(&'static str, SessionInputValue<'_>)>, name: &'static str) -> Result<Array3<f32>, EngineError> {
    let out = graph.run(inputs, |outputs| {
        let view = outputs[name].try_extract_array::<f32>()?;
        Ok(view.to_owned())
    })?;
    out.into_dimensionality::<Ix3>().map_err(|e| EngineError::Contract(format!("{}: output `{name}` is not rank 3: {e}", graph.file())))
}

/// Runs a head graph; returns `[rows, labels]` logits.
pub fn run_head(graph: &Graph, hidden: &Array3<f32>) -> Result<Array2<f32>, EngineError> {
    let view = hidden.view();
    let out = graph.run(vec![("hidden", f32_input(&view)?)], |outputs| Ok(outputs["logits"].try_extract_array::<f32>()?.to_owned()))?;
    out.into_dimensionality().map_err(|e| EngineError::Contract(format!("{}: logits are not rank 2: {e}", graph.file())))
}

/// Runs a slot graph `(h, x) -> y`, on the given rows only (all rows when `rows` is None).
pub fn run_slot(graph: &Graph, h: &Array3<f32>, x: &Array3<f32>, rows: Option<&[usize]>) -> Result<Array3<f32>, EngineError> {
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
