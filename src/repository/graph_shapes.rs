//! Shape propagation for the size checks of `graph_check`: every tensor of a task graph's top
//! level, at the probe batch, for the operators of [`TASK_OPS`] (an operator trusted through
//! `admin.extra_task_ops` makes its outputs unknown, and unknown shapes are not checked).

use std::collections::{BTreeSet, HashMap};

use super::graph_check::{MAX_GROWTH, MAX_TOTAL_GROWTH, OpPolicy, PROBE_BATCH, PROBE_OTHER, PROBE_TOKENS, TASK_OPS};
use super::onnx_proto::{GraphProto, NodeProto, TensorProto, data_type};

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
pub(super) struct Shapes<'a> {
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
    pub(super) fn new(graph: &GraphProto, policy: &'a OpPolicy, opset: i64) -> Result<Self, String> {
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

    /// Propagates shapes node by node; the first tensor over its limit is the error.
    pub(super) fn run(mut self, graph: &GraphProto) -> Result<(), String> {
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
pub(super) fn broadcast(a: &[u64], b: &[u64]) -> Result<Vec<u64>, String> {
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
pub(super) fn matmul(a: &[u64], b: &[u64]) -> Result<Vec<u64>, String> {
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
