//! Thin glue between ndarray buffers and ONNX Runtime graph runs.

use ndarray::{Array2, Array3, ArrayView2, ArrayView3, Axis, Ix3};
use ort::memory::AllocationDevice;
use ort::session::SessionInputValue;
use ort::value::{DynValue, TensorRef, TensorValueType};

use crate::error::ServeError;
use crate::runtime::{Device, Graph};

/// Hidden states `[rows, tokens, hidden]`: on the host, or left on the GPU between CUDA graphs
/// (only the row splits and the heads bring them back to the host).
pub enum Hidden {
    Host(Array3<f32>),
    Device(DynValue),
}

impl Hidden {
    pub fn rows(&self) -> Result<usize, ServeError> {
        Ok(match self {
            Self::Host(a) => a.len_of(Axis(0)),
            Self::Device(v) => match v.dtype() {
                ort::value::ValueType::Tensor { shape, .. } if !shape.is_empty() => shape[0] as usize,
                other => return Err(ServeError::Internal(format!("device hidden states are {other:?}, not a tensor"))),
            },
        })
    }

    /// A graph input reading these states where they are, without copying.
    pub fn input(&self) -> Result<SessionInputValue<'_>, ServeError> {
        Ok(match self {
            Self::Host(a) => TensorRef::from_array_view(a.view())?.into(),
            Self::Device(v) => v.into(),
        })
    }

    /// The states on the host (a device-to-host copy for GPU states).
    pub fn into_host(self) -> Result<Array3<f32>, ServeError> {
        match self {
            Self::Host(a) => Ok(a),
            Self::Device(v) => {
                let host = v.downcast::<TensorValueType<f32>>()?.to(AllocationDevice::CPU, 0)?;
                host.extract_array()
                    .to_owned()
                    .into_dimensionality::<Ix3>()
                    .map_err(|e| ServeError::Internal(format!("device hidden states are not rank 3: {e}")))
            }
        }
    }
}

/// Runs `graph` and keeps its output `name` on the graph's device.
pub fn run_hidden(graph: &Graph, inputs: Vec<(&'static str, SessionInputValue<'_>)>, name: &'static str) -> Result<Hidden, ServeError> {
    match graph.device() {
        Device::Cpu => Ok(Hidden::Host(run3(graph, inputs, name)?)),
        Device::Cuda { .. } => Ok(Hidden::Device(graph.run_on_device(inputs, name)?)),
    }
}

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
