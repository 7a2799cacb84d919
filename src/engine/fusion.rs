//! AdapterFusion slots in the executor: every fused adapter runs once over the distinct input rows
//! that any fusion at this slot needs it for (rows copied at this very slot share their `(h, x)`),
//! then each fusion graph runs on its own rows with the stacked adapter outputs. A plain adapter
//! task whose slot declares the same adapter's output graph joins in: its `y = LN(up + h + x)` is
//! the backbone's plain slot applied to `(h + up, x)`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ndarray::{Array2, Array3, Array4, Axis, CowArray, Ix3, s};

use super::executor::ExecStats;
use super::tensors::f32_input;
use crate::error::EngineError;
use crate::repository::{FusionSlot, Location};
use crate::runtime::Graph;
use ort::session::SessionInputValue;
use ort::value::TensorRef;

/// Average-able AdapterFusion weights of one lane at one fusion slot: per adapter, the sum of its
/// attention weight over the lane's real (unpadded) tokens, and the token count.
#[derive(Debug, Clone, PartialEq)]
pub struct FusionWeights {
    pub layer: usize,
    pub location: Location,
    pub adapters: Vec<String>,
    pub sums: Vec<f64>,
    pub tokens: u64,
}

impl FusionWeights {
    /// Per-adapter mean weight over the tokens seen.
    pub fn means(&self) -> Vec<f64> {
        self.sums.iter().map(|s| if self.tokens == 0 { 0.0 } else { s / self.tokens as f64 }).collect()
    }
}

/// What one group of rows takes at this slot.
pub enum Kind<'a> {
    Fusion(&'a Arc<FusionSlot>),
    /// A plain adapter slot computed from its output graph `up` and the backbone's plain slot.
    Adapter {
        up: &'a Arc<Graph>,
        plain: &'a Graph,
    },
}

/// One choice at one slot and the (post-split) physical rows that take it.
pub struct Group<'a> {
    pub kind: Kind<'a>,
    pub rows: &'a [usize],
}

impl Group<'_> {
    fn graphs(&self) -> Vec<&Arc<Graph>> {
        match &self.kind {
            Kind::Fusion(f) => f.adapters.iter().map(|a| &a.graph).collect(),
            Kind::Adapter { up, .. } => vec![*up],
        }
    }
}

/// Outputs of one group: `y [n,T,H]`, and for fusions `alpha [n,T,N]`.
pub struct GroupOut {
    pub y: Array3<f32>,
    pub alpha: Option<Array3<f32>>,
}

/// Runs all fusion groups of one slot. `origin[r]` is the pre-split row whose `(h, x)` row `r`
/// copies (itself for rows that were not copied here).
pub fn run_groups(
    groups: &[Group],
    origin: &[usize],
    h: &Array3<f32>,
    x: &Array3<f32>,
    stats: &mut ExecStats,
) -> Result<Vec<GroupOut>, EngineError> {
    // Distinct adapter graphs -> distinct origin rows they are needed on.
    let mut need: BTreeMap<usize, (&Arc<Graph>, BTreeSet<usize>)> = BTreeMap::new();
    let mut asked = 0;
    for g in groups {
        for graph in g.graphs() {
            let entry = need.entry(Arc::as_ptr(graph) as usize).or_insert_with(|| (graph, BTreeSet::new()));
            entry.1.extend(g.rows.iter().map(|&r| origin[r]));
            asked += g.rows.len();
        }
    }
    let mut ups: HashMap<usize, (Array3<f32>, HashMap<usize, usize>)> = HashMap::new();
    for (ptr, (graph, rows)) in need {
        let rows: Vec<usize> = rows.into_iter().collect();
        let (hs, xs) = (pick(h, &rows), pick(x, &rows));
        let (hv, xv) = (hs.view(), xs.view());
        let up = super::tensors::run3(graph, vec![("h", f32_input(&hv)?), ("x", f32_input(&xv)?)], "up")?;
        stats.adapter_rows += rows.len();
        stats.fusion_adapter_rows += rows.len();
        ups.insert(ptr, (up, rows.iter().enumerate().map(|(i, &r)| (r, i)).collect()));
    }
    stats.fusion_adapter_rows_saved += asked - ups.values().map(|(_, m)| m.len()).sum::<usize>();
    let (t, hid) = (h.len_of(Axis(1)), h.len_of(Axis(2)));
    let mut out = Vec::with_capacity(groups.len());
    for g in groups {
        let slot = match g.kind {
            Kind::Fusion(slot) => slot,
            Kind::Adapter { up, plain } => {
                let (res, at) = &ups[&(Arc::as_ptr(up) as usize)];
                let picked: Vec<usize> = g.rows.iter().map(|r| at[&origin[*r]]).collect();
                let hp = &pick(h, g.rows) + &pick(res, &picked);
                let xs = pick(x, g.rows);
                let (hv, xv) = (hp.view(), xs.view());
                let y = super::tensors::run3(plain, vec![("h", f32_input(&hv)?), ("x", f32_input(&xv)?)], "y")?;
                out.push(GroupOut { y, alpha: None });
                continue;
            }
        };
        let n = slot.adapters.len();
        let mut up = Array4::<f32>::zeros((g.rows.len(), t, n, hid));
        for (j, a) in slot.adapters.iter().enumerate() {
            let (res, at) = &ups[&(Arc::as_ptr(&a.graph) as usize)];
            if res.len_of(Axis(0)) == g.rows.len() && g.rows.iter().enumerate().all(|(i, &r)| at[&origin[r]] == i) {
                up.slice_mut(s![.., .., j, ..]).assign(res);
                continue;
            }
            for (i, &r) in g.rows.iter().enumerate() {
                up.slice_mut(s![i, .., j, ..]).assign(&res.index_axis(Axis(0), at[&origin[r]]));
            }
        }
        let (hs, xs) = (pick(h, g.rows), pick(x, g.rows));
        let (hv, xv, uv) = (hs.view(), xs.view(), up.view());
        let up_in: SessionInputValue<'_> = TensorRef::from_array_view(uv)?.into();
        let (y, alpha) = slot.graph.run(vec![("h", f32_input(&hv)?), ("x", f32_input(&xv)?), ("up", up_in)], |o| {
            Ok((o["y"].try_extract_array::<f32>()?.to_owned(), o["alpha"].try_extract_array::<f32>()?.to_owned()))
        })?;
        let rank3 = |a: ndarray::ArrayD<f32>, name: &str| {
            a.into_dimensionality::<Ix3>().map_err(|e| EngineError::Contract(format!("{}: `{name}` is not rank 3: {e}", slot.graph.file())))
        };
        out.push(GroupOut { y: rank3(y, "y")?, alpha: Some(rank3(alpha, "alpha")?) });
    }
    Ok(out)
}

/// The given rows of `a`, borrowed without a copy when they are all rows in order.
fn pick<'a>(a: &'a Array3<f32>, rows: &[usize]) -> CowArray<'a, f32, Ix3> {
    if rows.len() == a.len_of(Axis(0)) && rows.iter().enumerate().all(|(i, &r)| i == r) {
        CowArray::from(a.view())
    } else {
        CowArray::from(a.select(Axis(0), rows))
    }
}

/// Adds one group's attention weights to the statistics of the lanes on its rows.
/// `stats.fusion` grows to the highest lane index seen; lanes past its end have no fusion weights.
pub fn record(
    stats: &mut ExecStats,
    (layer, location): (usize, Location),
    slot: &FusionSlot,
    rows: &[usize],
    alpha: &Array3<f32>,
    mask: &Array2<i64>,
    lanes_of: &[Vec<usize>],
) {
    let n = slot.adapters.len();
    for (i, &r) in rows.iter().enumerate() {
        let mut sums = vec![0f64; n];
        let mut tokens = 0u64;
        for (t, m) in mask.row(r).iter().enumerate() {
            if *m != 0 {
                tokens += 1;
                for (j, v) in alpha.slice(s![i, t, ..]).iter().enumerate() {
                    sums[j] += *v as f64;
                }
            }
        }
        for &lane in &lanes_of[r] {
            if stats.fusion.len() <= lane {
                stats.fusion.resize(lane + 1, Vec::new());
            }
            let list = &mut stats.fusion[lane];
            let idx = match list.iter().position(|w| w.layer == layer && w.location == location) {
                Some(k) => k,
                None => {
                    list.push(FusionWeights { layer, location, adapters: slot.adapter_names(), sums: vec![0.0; n], tokens: 0 });
                    list.len() - 1
                }
            };
            let w = &mut list[idx];
            w.tokens += tokens;
            w.sums.iter_mut().zip(&sums).for_each(|(a, b)| *a += b);
        }
    }
}
