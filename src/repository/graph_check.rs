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

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::onnx_proto::{GraphProto, ModelProto, NodeProto, TensorProto, attribute_type, data_type};
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
const PROBE_OTHER: u64 = 8;
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

/// A tensor's shape at the probe size, and whether it depends on the graph's inputs.
#[derive(Debug, Clone)]
struct Known {
    dims: Vec<u64>,
    dynamic: bool,
}

impl Known {
    fn elements(&self) -> u128 {
        self.dims.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128))
    }
}

/// Shape propagation over the top-level graph. `None` = unknown (after a trusted extra operator).
struct Shapes<'a> {
    policy: &'a OpPolicy,
    opset: i64,
    shapes: HashMap<String, Option<Known>>,
    /// Values of small int64 constants (axes, indices).
    ints: HashMap<String, Vec<i64>>,
    largest_input: u128,
    largest_weight: u128,
    total_dynamic: u128,
}

impl<'a> Shapes<'a> {
    fn new(graph: &GraphProto, policy: &'a OpPolicy, opset: i64) -> Result<Self, String> {
        let mut s =
            Self { policy, opset, shapes: HashMap::new(), ints: HashMap::new(), largest_input: 1, largest_weight: 4096, total_dynamic: 0 };
        for t in &graph.initializer {
            s.constant(t);
        }
        let weights: BTreeSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        for input in graph.input.iter().filter(|i| !weights.contains(i.name.as_str())) {
            let shape = input.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()).and_then(|t| t.shape.as_ref());
            let Some(shape) = shape else { return Err(format!("input `{}` has no declared tensor shape", input.name)) };
            let rank = shape.dim.len();
            let dims: Vec<u64> = shape
                .dim
                .iter()
                .enumerate()
                .map(|(axis, d)| match d.dim_value {
                    // The hidden size is fixed by the contract; everything before it is probed.
                    Some(v) if v > 0 && axis + 1 == rank => v as u64,
                    _ => [PROBE_BATCH, PROBE_TOKENS].get(axis).copied().unwrap_or(PROBE_OTHER),
                })
                .collect();
            let known = Known { dims, dynamic: true };
            s.largest_input = s.largest_input.max(known.elements());
            s.shapes.insert(input.name.clone(), Some(known));
        }
        Ok(s)
    }

    fn constant(&mut self, t: &TensorProto) {
        let dims: Vec<u64> = t.dims.iter().map(|&d| d.max(0) as u64).collect();
        let known = Known { dims, dynamic: false };
        self.largest_weight = self.largest_weight.max(known.elements());
        if t.data_type == data_type::INT64 && known.elements() <= 64 {
            let values = if t.raw_data.is_empty() {
                t.int64_data.clone()
            } else {
                t.raw_data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
            };
            self.ints.insert(t.name.clone(), values);
        }
        self.shapes.insert(t.name.clone(), Some(known));
    }

    fn run(mut self, graph: &GraphProto) -> Result<(), String> {
        for n in &graph.node {
            let out = self.infer(n).map_err(|why| format!("node `{}` ({}): {why}", n.name, n.op_type))?;
            if let Some(k) = &out {
                let n_el = k.elements();
                let (limit, what) = if k.dynamic {
                    (MAX_GROWTH.saturating_mul(self.largest_input), format!("{MAX_GROWTH} times the largest input"))
                } else {
                    (self.largest_weight, "the largest weight".to_string())
                };
                if n_el > limit {
                    return Err(format!(
                        "node `{}` ({}) would produce {n_el} elements ({:?}) for a batch of {PROBE_BATCH} x {PROBE_TOKENS} tokens, \
                         more than {what} ({limit}); task graphs may not expand their inputs like this",
                        n.name, n.op_type, k.dims
                    ));
                }
                if k.dynamic {
                    self.total_dynamic = self.total_dynamic.saturating_add(n_el.saturating_mul(n.output.len() as u128));
                    let total = MAX_TOTAL_GROWTH.saturating_mul(self.largest_input);
                    if self.total_dynamic > total {
                        return Err(format!(
                            "its intermediate tensors would hold more than {total} elements together ({MAX_TOTAL_GROWTH} times the largest input) \
                             for a batch of {PROBE_BATCH} x {PROBE_TOKENS} tokens"
                        ));
                    }
                }
            }
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                self.shapes.insert(o.clone(), out.clone());
            }
        }
        Ok(())
    }

    fn input(&self, n: &NodeProto, i: usize) -> Result<Option<&Known>, String> {
        let name = n.input.get(i).filter(|s| !s.is_empty()).ok_or_else(|| format!("input {i} is missing"))?;
        match self.shapes.get(name) {
            Some(k) => Ok(k.as_ref()),
            None => Err(format!("input `{name}` is not produced by an earlier node, an initializer or a graph input")),
        }
    }

    /// The output shape (every output of the supported operators has at most this many elements).
    fn infer(&mut self, n: &NodeProto) -> Result<Option<Known>, String> {
        if self.policy.extra.contains(&n.op_type) && !TASK_OPS.contains(&n.op_type.as_str()) {
            return Ok(None);
        }
        if n.op_type == "Constant" {
            return constant_node(n).map(|k| {
                if let Some(t) = n.attribute.iter().find_map(|a| a.t.as_ref()) {
                    let mut t = t.clone();
                    t.name = n.output.first().cloned().unwrap_or_default();
                    self.constant(&t);
                }
                Some(k)
            });
        }
        let mut inputs = Vec::new();
        for i in 0..n.input.len() {
            if n.input[i].is_empty() {
                continue;
            }
            match self.input(n, i)? {
                Some(k) => inputs.push(k.clone()),
                None => return Ok(None),
            }
        }
        let first = inputs.first().cloned().ok_or("has no inputs")?;
        let dynamic = inputs.iter().any(|k| k.dynamic);
        let dims = match n.op_type.as_str() {
            "Add" | "Sub" | "Mul" | "Div" => broadcast(&first.dims, &inputs.get(1).ok_or("needs two inputs")?.dims)?,
            "MatMul" => matmul(&first.dims, &inputs.get(1).ok_or("needs two inputs")?.dims)?,
            "Gather" => {
                let indices = inputs.get(1).ok_or("needs indices")?;
                let axis = axis_of(n, "axis", 0, first.dims.len())?;
                let mut d = first.dims[..axis].to_vec();
                d.extend(&indices.dims);
                d.extend(&first.dims[axis + 1..]);
                d
            }
            "Unsqueeze" => {
                let axes = self.axes(n)?.ok_or("needs constant `axes`")?;
                let rank = first.dims.len() + axes.len();
                let mut axes: Vec<usize> = axes.iter().map(|&a| normalize(a, rank)).collect::<Result<_, _>>()?;
                axes.sort_unstable();
                axes.dedup();
                if axes.len() + first.dims.len() != rank {
                    return Err("repeats an axis".into());
                }
                let mut rest = first.dims.iter();
                (0..rank).map(|i| if axes.contains(&i) { 1 } else { *rest.next().expect("rank matches") }).collect()
            }
            "Squeeze" => match self.axes(n)? {
                None => first.dims.iter().copied().filter(|&d| d != 1).collect(),
                Some(axes) => {
                    let axes: Vec<usize> = axes.iter().map(|&a| normalize(a, first.dims.len())).collect::<Result<_, _>>()?;
                    if axes.iter().any(|&a| first.dims[a] != 1) {
                        return Err("squeezes an axis that is not 1".into());
                    }
                    first.dims.iter().enumerate().filter(|(i, _)| !axes.contains(i)).map(|(_, d)| *d).collect()
                }
            },
            // Element-wise, and LayerNormalization (its optional mean / inv_std outputs are smaller).
            _ => first.dims.clone(),
        };
        Ok(Some(Known { dims, dynamic }))
    }

    /// `axes` of Unsqueeze / Squeeze: an attribute before opset 13, a constant input since.
    fn axes(&self, n: &NodeProto) -> Result<Option<Vec<i64>>, String> {
        if self.opset < 13 {
            return Ok(n.attribute.iter().find(|a| a.name == "axes").map(|a| a.ints.clone()));
        }
        match n.input.get(1).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(name) => self.ints.get(name).cloned().map(Some).ok_or_else(|| format!("`axes` ({name}) must be a constant initializer")),
        }
    }
}

fn constant_node(n: &NodeProto) -> Result<Known, String> {
    let a = n.attribute.first().ok_or("has no value")?;
    let dims = match (a.name.as_str(), &a.t) {
        ("value", Some(t)) => t.dims.iter().map(|&d| d.max(0) as u64).collect(),
        ("value_float" | "value_int", _) => vec![],
        ("value_floats", _) => vec![a.floats.len() as u64],
        ("value_ints", _) => vec![a.ints.len() as u64],
        (other, _) => return Err(format!("value attribute `{other}` is not supported in task graphs")),
    };
    Ok(Known { dims, dynamic: false })
}

fn axis_of(n: &NodeProto, name: &str, default: i64, rank: usize) -> Result<usize, String> {
    let v = n.attribute.iter().find(|a| a.name == name).and_then(|a| a.i).unwrap_or(default);
    normalize(v, rank)
}

fn normalize(axis: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) { Ok(a as usize) } else { Err(format!("axis {axis} is outside rank {rank}")) }
}

/// Numpy-style multidirectional broadcasting.
fn broadcast(a: &[u64], b: &[u64]) -> Result<Vec<u64>, String> {
    let rank = a.len().max(b.len());
    let at = |d: &[u64], i: usize| if i + d.len() >= rank { d[i + d.len() - rank] } else { 1 };
    (0..rank)
        .map(|i| match (at(a, i), at(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            (x, y) => Err(format!("shapes {a:?} and {b:?} do not broadcast ({x} vs {y})")),
        })
        .collect()
}

/// `numpy.matmul` shapes.
fn matmul(a: &[u64], b: &[u64]) -> Result<Vec<u64>, String> {
    if a.is_empty() || b.is_empty() {
        return Err("MatMul of a scalar".into());
    }
    let a2: Vec<u64> = if a.len() == 1 { vec![1, a[0]] } else { a.to_vec() };
    let b2: Vec<u64> = if b.len() == 1 { vec![b[0], 1] } else { b.to_vec() };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(format!("shapes {a:?} and {b:?} cannot be multiplied ({k} vs {k2})"));
    }
    let mut out = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
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
