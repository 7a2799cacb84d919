//! Row gathers and concatenations on the GPU, as tiny ONNX graphs built in memory with ONNX
//! Runtime's model editor API. Where tasks' paths split, hidden states are regrouped on the device
//! instead of travelling to the host and back (which cost more than the layers themselves).

use std::collections::HashMap;
use std::sync::Mutex;

use ort::editor::{Graph as EditorGraph, Model, Node, ONNX_DOMAIN, Opset};
use ort::environment::Environment;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::operator::Attribute;
use ort::session::Session;
use ort::session::builder::SessionBuilder;
use ort::value::{DynValue, Outlet, Shape, SymbolicDimensions, Tensor, TensorElementType, ValueType};

pub struct RowOps {
    env: Environment,
    device_id: i32,
    gather: Mutex<Session>,
    /// Concat sessions by number of inputs, built on first use.
    concat: Mutex<HashMap<usize, Session>>,
}

fn tensor(name: &str, ty: TensorElementType, dims: &[&str]) -> Outlet {
    Outlet::new(
        name,
        ValueType::Tensor {
            ty,
            shape: Shape::new(dims.iter().map(|_| -1i64)),
            dimension_symbols: SymbolicDimensions::new(dims.iter().map(|d| d.to_string())),
        },
    )
}

fn cuda_session(env: &Environment, device_id: i32, graph: EditorGraph) -> ort::Result<Session> {
    let builder = SessionBuilder::new(env)?
        .with_execution_providers([ort::ep::CUDA::default().with_device_id(device_id).build().error_on_failure()])
        .map_err(|e| -> ort::Error { e.into() })?;
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 17)?])?;
    model.set_graph(graph)?;
    model.into_session(&builder)
}

impl RowOps {
    pub fn new(env: &Environment, device_id: i32) -> ort::Result<Self> {
        let mut g = EditorGraph::new()?;
        g.set_inputs([tensor("data", TensorElementType::Float32, &["n", "t", "h"]), tensor("indices", TensorElementType::Int64, &["m"])])?;
        g.set_outputs([tensor("out", TensorElementType::Float32, &["m", "t", "h"])])?;
        g.add_node(Node::new("Gather", ONNX_DOMAIN, "gather", ["data", "indices"], ["out"], [Attribute::new("axis", 0i64)?])?)?;
        let gather = cuda_session(env, device_id, g)?;
        Ok(Self { env: env.clone(), device_id, gather: Mutex::new(gather), concat: Mutex::new(HashMap::new()) })
    }

    fn device_memory(&self) -> ort::Result<MemoryInfo<'static>> {
        MemoryInfo::new(AllocationDevice::CUDA, self.device_id, AllocatorType::Device, MemoryType::Default)
    }

    /// `data[rows]` along the first axis, on the device.
    pub fn gather(&self, data: &DynValue, rows: &[usize]) -> ort::Result<DynValue> {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let indices = Tensor::from_array(([idx.len()], idx))?;
        let mut session = self.gather.lock().unwrap_or_else(|p| p.into_inner());
        let mut binding = session.create_binding()?;
        binding.bind_input("data", data)?;
        binding.bind_input("indices", &indices)?;
        binding.bind_output_to_device("out", &self.device_memory()?)?;
        super::count_run();
        let mut out = session.run_binding(&binding)?;
        out.remove("out").ok_or_else(|| ort::Error::new("gather graph has no output"))
    }

    /// The parts stacked along the first axis, on the device.
    pub fn concat(&self, parts: &[DynValue]) -> ort::Result<DynValue> {
        let mut sessions = self.concat.lock().unwrap_or_else(|p| p.into_inner());
        let n = parts.len();
        let session = match sessions.entry(n) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let names: Vec<String> = (0..n).map(|i| format!("in{i}")).collect();
                let rows: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
                let mut g = EditorGraph::new()?;
                g.set_inputs(names.iter().zip(&rows).map(|(name, r)| tensor(name, TensorElementType::Float32, &[r, "t", "h"])))?;
                g.set_outputs([tensor("out", TensorElementType::Float32, &["rows", "t", "h"])])?;
                g.add_node(Node::new("Concat", ONNX_DOMAIN, "concat", &names, ["out"], [Attribute::new("axis", 0i64)?])?)?;
                e.insert(cuda_session(&self.env, self.device_id, g)?)
            }
        };
        let mut binding = session.create_binding()?;
        for (i, part) in parts.iter().enumerate() {
            binding.bind_input(format!("in{i}"), part)?;
        }
        binding.bind_output_to_device("out", &self.device_memory()?)?;
        super::count_run();
        let mut out = session.run_binding(&binding)?;
        out.remove("out").ok_or_else(|| ort::Error::new("concat graph has no output"))
    }
}
