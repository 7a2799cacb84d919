//! Checks of an uploaded task graph file before ONNX Runtime loads it: session creation already
//! folds constants and a trial run executes the graph, so a hostile file (a 10^12-step `Loop`, a
//! `Tile` or broadcast that blows a small input up to gigabytes, weights read from another file)
//! must be refused from its bytes alone.
//!
//! - Operators: only those the exporters emit for task graphs ([`TASK_OPS`]), standard domain,
//!   no model-local functions and no subgraphs; `admin.extra_task_ops` trusts more (their nodes
//!   are then not size-checked, but the trial run's time limit still applies).
//! - Tensors: no external or sparse data; every initializer holds exactly the data its dims say.
//! - Size: shapes are propagated for a probe batch of [`PROBE_BATCH`] x [`PROBE_TOKENS`] tokens.
//!   A tensor that depends on the inputs may hold at most [`MAX_GROWTH`] times the elements of
//!   the largest input, all of them together [`MAX_TOTAL_GROWTH`] times; a tensor computed from
//!   weights alone (which session creation folds) no more than the largest weight.

use std::collections::BTreeSet;
use std::path::Path;

use super::graph_shapes::Shapes;
use super::onnx_proto::{GraphProto, ModelProto, TensorProto, attribute_type, data_type};
use crate::error::LoadError;

/// Operators of the adapter, fusion, adapter-output and head graphs `tools/` writes, plus a few
/// element-wise ones of the same cost.
pub const TASK_OPS: &[&str] = &[
    "Abs",
    "Add",
    "Cast",
    "Constant",
    "Div",
    "Erf",
    "Exp",
    "Gather",
    "Identity",
    "LayerNormalization",
    "MatMul",
    "Mul",
    "Neg",
    "Relu",
    "Sigmoid",
    "Softmax",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Unsqueeze",
];
/// Most nodes one task graph may have (the exporters write fewer than 40).
pub const MAX_NODES: usize = 4096;
pub const PROBE_BATCH: u64 = 8;
pub const PROBE_TOKENS: u64 = 512;
/// Symbolic dimensions after batch and tokens (the adapter axis of a fusion input).
pub const PROBE_OTHER: u64 = 8;
pub const MAX_GROWTH: u128 = 16;
pub const MAX_TOTAL_GROWTH: u128 = 64;
/// Highest standard operator set accepted (ONNX Runtime 1.31 implements up to 23).
const MAX_OPSET: i64 = 23;

/// Which operators task graphs may use.
#[derive(Debug, Clone, Default)]
pub struct OpPolicy {
    /// Trusted beyond [`TASK_OPS`] (`admin.extra_task_ops`).
    pub extra: BTreeSet<String>,
}

impl OpPolicy {
    /// From a comma-separated list of operator names.
    pub fn with_extra(list: &str) -> Self {
        Self { extra: list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect() }
    }

    fn allowed(&self, op: &str) -> bool {
        TASK_OPS.contains(&op) || self.extra.contains(op)
    }
}

/// Checks the graph file at `path` (see the module doc); the error names the file.
pub fn check_file(path: &Path, policy: &OpPolicy) -> Result<(), LoadError> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => LoadError::new(path, "file is missing"),
        _ => LoadError::new(path, format!("cannot read: {e}")),
    })?;
    let model = ModelProto::parse(bytes.into()).map_err(|e| LoadError::new(path, format!("not a loadable ONNX graph: {e}")))?;
    check_model(&model, policy).map_err(|problem| LoadError::new(path, problem))
}

pub fn check_model(model: &ModelProto, policy: &OpPolicy) -> Result<(), String> {
    if let Some(f) = model.functions.first() {
        return Err(format!("defines the function `{}`; task graphs may use only standard ONNX operators", f.name));
    }
    let mut opset = None;
    for o in &model.opset_import {
        if !standard(&o.domain) {
            return Err(format!("imports the operator set `{}`; task graphs may use only the standard ONNX domain", o.domain));
        }
        opset = Some(o.version);
    }
    let opset = opset.ok_or("imports no standard operator set")?;
    if !(1..=MAX_OPSET).contains(&opset) {
        return Err(format!("uses operator set version {opset}; supported: 1..={MAX_OPSET}"));
    }
    let graph = model.graph.as_ref().ok_or("holds no graph")?;
    let mut nodes = 0;
    check_graph(graph, policy, &mut nodes)?;
    Shapes::new(graph, policy, opset)?.run(graph)
}

fn standard(domain: &str) -> bool {
    domain.is_empty() || domain == "ai.onnx"
}

/// Operators, subgraphs and tensors of `graph` and everything nested in it.
fn check_graph(graph: &GraphProto, policy: &OpPolicy, nodes: &mut usize) -> Result<(), String> {
    if !graph.sparse_initializer.is_empty() {
        return Err("holds sparse initializers; store weights densely".into());
    }
    for t in &graph.initializer {
        check_tensor(t)?;
    }
    for n in &graph.node {
        *nodes += 1;
        if *nodes > MAX_NODES {
            return Err(format!("has more than {MAX_NODES} nodes"));
        }
        if !standard(&n.domain) {
            return Err(format!(
                "node `{}` uses operator `{}` of domain `{}`; only the standard domain is allowed",
                n.name, n.op_type, n.domain
            ));
        }
        if !policy.allowed(&n.op_type) {
            return Err(format!(
                "node `{}` uses operator `{}`, which task graphs may not use (allowed: {}; admin.extra_task_ops adds more)",
                n.name,
                n.op_type,
                TASK_OPS.join(", ")
            ));
        }
        let trusted = policy.extra.contains(&n.op_type);
        for a in &n.attribute {
            let subgraphs: Vec<&GraphProto> = a.g.iter().chain(&a.graphs).collect();
            if (!subgraphs.is_empty() || a.r#type == attribute_type::GRAPH) && !trusted {
                return Err(format!("node `{}` ({}) holds a subgraph; task graphs may not", n.name, n.op_type));
            }
            for g in subgraphs {
                check_graph(g, policy, nodes)?;
            }
            for t in a.t.iter().chain(&a.tensors) {
                check_tensor(t)?;
            }
        }
    }
    Ok(())
}

/// No external data; exactly as much data as the dims say.
fn check_tensor(t: &TensorProto) -> Result<(), String> {
    if t.data_location == 1 || !t.external_data.is_empty() {
        return Err(format!("tensor `{}` keeps its data in another file; embed every weight in the graph file", t.name));
    }
    let elements = elements_of(&t.dims).ok_or_else(|| format!("tensor `{}` has invalid dims {:?}", t.name, t.dims))?;
    let width: Option<u128> = match t.data_type {
        2 | 3 | 9 => Some(1),                  // uint8, int8, bool
        4 | 5 | 10 | 16 => Some(2),            // uint16, int16, float16, bfloat16
        data_type::FLOAT | 6 | 12 => Some(4),  // float, int32, uint32
        data_type::INT64 | 11 | 13 => Some(8), // int64, double, uint64
        _ => None,
    };
    let typed = [t.float_data.len(), t.int32_data.len(), t.string_data.len(), t.int64_data.len(), t.double_data.len(), t.uint64_data.len()]
        .into_iter()
        .max()
        .unwrap_or(0) as u128;
    let consistent = match width {
        Some(w) if !t.raw_data.is_empty() => t.raw_data.len() as u128 == elements * w,
        Some(_) => typed == elements,
        None => return Err(format!("tensor `{}` has data type {}, which task graphs do not use", t.name, t.data_type)),
    };
    if !consistent {
        return Err(format!("tensor `{}` declares {elements} elements ({:?}) but holds a different amount of data", t.name, t.dims));
    }
    Ok(())
}

fn elements_of(dims: &[i64]) -> Option<u128> {
    dims.iter().try_fold(1u128, |acc, &d| if d < 0 { None } else { acc.checked_mul(d as u128).filter(|n| *n <= u64::MAX as u128) })
}

#[cfg(test)]
mod tests {
    use super::super::graph_shapes::{broadcast, matmul};
    use super::super::onnx_proto::NodeProto;
    use super::super::onnx_proto::build::*;
    use super::super::onnx_proto::data_type::FLOAT;
    use super::*;

    const H: i64 = 32;

    fn head(nodes: Vec<NodeProto>, inits: Vec<TensorProto>) -> ModelProto {
        model(GraphProto {
            node: nodes,
            name: "head".into(),
            initializer: inits,
            input: vec![value("hidden", FLOAT, Some(&[None, None, Some(H)]))],
            output: vec![value("logits", FLOAT, Some(&[None, Some(2)]))],
            sparse_initializer: vec![],
        })
    }

    fn plain_head() -> (Vec<NodeProto>, Vec<TensorProto>) {
        (
            vec![
                node("Gather", &["hidden", "zero"], &["first"], vec![int_attr("axis", 1)]),
                node("MatMul", &["first", "w"], &["logits"], vec![]),
            ],
            vec![int64s("zero", &[], &[0]), floats("w", &[H, 2], &[0.5; 64])],
        )
    }

    #[test]
    fn exporter_like_graphs_pass() {
        let (nodes, inits) = plain_head();
        check_model(&head(nodes, inits), &OpPolicy::default()).unwrap();
    }

    #[test]
    fn unknown_operators_and_subgraphs_are_refused() {
        let (mut nodes, inits) = plain_head();
        nodes.insert(0, node("Tile", &["hidden", "reps"], &["big"], vec![]));
        let e = check_model(&head(nodes.clone(), inits.clone()), &OpPolicy::default()).unwrap_err();
        assert!(e.contains("`Tile`") && e.contains("may not use"), "{e}");
        // Trusted through admin.extra_task_ops: accepted, its output not size-checked.
        check_model(&head(nodes, inits), &OpPolicy::with_extra("Tile, Loop")).unwrap();
    }

    #[test]
    fn broadcast_blow_up_is_refused_by_size() {
        let (mut nodes, mut inits) = plain_head();
        nodes.insert(0, node("Add", &["hidden", "ones"], &["wide"], vec![]));
        inits.push(floats("ones", &[1000, 1, 1, 1], &[1.0; 1000]));
        let e = check_model(&head(nodes, inits), &OpPolicy::default()).unwrap_err();
        assert!(e.contains("would produce") && e.contains("Add"), "{e}");
    }

    #[test]
    fn folded_constants_may_not_outgrow_the_weights() {
        let (mut nodes, mut inits) = plain_head();
        nodes.insert(0, node("MatMul", &["col", "row"], &["square"], vec![]));
        inits.push(floats("col", &[5000, 1], &[1.0; 5000]));
        inits.push(floats("row", &[1, 5000], &[1.0; 5000]));
        let e = check_model(&head(nodes, inits), &OpPolicy::default()).unwrap_err();
        assert!(e.contains("largest weight"), "{e}");
    }

    #[test]
    fn tensors_must_hold_their_data_inside_the_file() {
        let (nodes, mut inits) = plain_head();
        inits[1].raw_data = bytes::Bytes::from_static(&[0; 12]);
        assert!(check_model(&head(nodes.clone(), inits.clone()), &OpPolicy::default()).unwrap_err().contains("different amount"));
        let (_, mut inits) = plain_head();
        inits[1].data_location = 1;
        assert!(check_model(&head(nodes, inits), &OpPolicy::default()).unwrap_err().contains("another file"));
    }

    #[test]
    fn shapes_follow_numpy() {
        assert_eq!(broadcast(&[2, 5, 32], &[32]).unwrap(), vec![2, 5, 32]);
        assert_eq!(broadcast(&[2, 1, 32], &[7, 1]).unwrap(), vec![2, 7, 32]);
        assert!(broadcast(&[2, 5], &[3]).is_err());
        assert_eq!(matmul(&[2, 5, 32], &[32, 4]).unwrap(), vec![2, 5, 4]);
        assert_eq!(matmul(&[2, 5, 3, 32], &[2, 5, 32, 1]).unwrap(), vec![2, 5, 3, 1]);
        assert_eq!(matmul(&[32], &[32, 4]).unwrap(), vec![4]);
        assert!(matmul(&[2, 5, 31], &[32, 4]).is_err());
    }
}
