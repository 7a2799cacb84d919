//! AdapterFusion slots (models/README.md, "Fusion tasks"): per layer and location, a fusion graph
//! `(h, x, up [B,T,N,H]) -> (y, alpha [B,T,N])` over N fused adapters, each an output graph
//! `(h, x) -> up`. Adapters are kept apart from the fusion graph so that the engine can run one
//! adapter once for every fusion (and pruned variant) that uses it on the same rows, and so that a
//! pruned task is just a shorter adapter list beside the very same fusion graph.
//!
//! Graph files with identical bytes are loaded once per runtime ([`load_shared`]): a pruned task
//! written by `tools/prune_fusion.py` copies its source's files, so both tasks hold the same
//! `Arc<Graph>` for every shared adapter, which is what the engine's sharing keys on.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Weak};

use ort::value::TensorElementType as T;
use serde::{Deserialize, Serialize};

use super::manifest::{Location, SlotSpec, valid_name};
use super::task::{ActiveLayers, Task};
use crate::error::LoadError;
use crate::runtime::{ContentKey, Dim, Graph, IoSpec, Runtime};

/// What a `slots[]` entry of task.json holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    /// One bottleneck adapter slot graph `(h, x) -> y`.
    #[default]
    Adapter,
    /// An AdapterFusion slot: `graph` is the fusion graph, `adapters` the fused adapters.
    Fusion,
}

impl SlotKind {
    pub fn is_adapter(&self) -> bool {
        *self == Self::Adapter
    }
}

/// One fused adapter of a fusion slot in task.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FusedAdapterSpec {
    pub name: String,
    /// `(h, x) -> up`, relative to the task directory.
    pub graph: String,
}

/// A fused adapter: its name and its output graph (shared between tasks holding the same file).
#[derive(Debug)]
pub struct FusedAdapter {
    pub name: String,
    pub graph: Arc<Graph>,
}

/// A loaded fusion slot.
#[derive(Debug)]
pub struct FusionSlot {
    pub graph: Arc<Graph>,
    pub adapters: Vec<FusedAdapter>,
}

impl FusionSlot {
    /// Loads and checks one `"kind": "fusion"` slot of the task in `dir`.
    pub fn load(runtime: &Runtime, dir: &Path, spec: &SlotSpec, hidden: usize) -> Result<Self, LoadError> {
        let manifest = dir.join("task.json");
        let at = format!("fusion slot at layer {} {}", spec.layer, spec.location.as_str());
        if spec.adapters.is_empty() {
            return Err(LoadError::new(&manifest, format!("{at} lists no adapters")));
        }
        let mut seen = std::collections::BTreeSet::new();
        for a in &spec.adapters {
            if !valid_name(&a.name) || !seen.insert(a.name.as_str()) {
                return Err(LoadError::new(&manifest, format!("{at}: adapter name `{}` is invalid or repeated", a.name)));
            }
            if !inside(&a.graph) {
                return Err(LoadError::new(
                    &manifest,
                    format!("{at}: adapter graph path `{}` must stay inside the task directory", a.graph),
                ));
            }
        }
        let h = hidden as i64;
        let bth = [Dim::Any, Dim::Any, Dim::Fixed(h)];
        let (hx, y) = (vec![IoSpec::new("h", T::Float32, &bth), IoSpec::new("x", T::Float32, &bth)], IoSpec::new("y", T::Float32, &bth));
        let mut fusion_in = hx.clone();
        fusion_in.push(IoSpec::new("up", T::Float32, &[Dim::Any, Dim::Any, Dim::Any, Dim::Fixed(h)]));
        let fusion_out = [y, IoSpec::new("alpha", T::Float32, &[Dim::Any, Dim::Any, Dim::Any])];
        let graph = load_shared(runtime, &dir.join(&spec.graph), &fusion_in, &fusion_out)?;
        let up_out = [IoSpec::new("up", T::Float32, &bth)];
        let adapters = spec
            .adapters
            .iter()
            .map(|a| Ok(FusedAdapter { name: a.name.clone(), graph: load_shared(runtime, &dir.join(&a.graph), &hx, &up_out)? }))
            .collect::<Result<_, LoadError>>()?;
        Ok(Self { graph, adapters })
    }

    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.iter().map(|a| a.name.clone()).collect()
    }
}

/// Relative path that cannot leave the task directory.
pub fn inside(path: &str) -> bool {
    !path.contains("..") && !Path::new(path).is_absolute()
}

impl Task {
    /// The fusion slot at `(layer, location)`, if the task has one there and the layer is active.
    pub fn fusion_slot(&self, active: &ActiveLayers, layer: usize, location: Location) -> Option<&Arc<FusionSlot>> {
        if active.0[layer] { self.fusion.get(&(layer, location)) } else { None }
    }

    /// The output graph `(h, x) -> up` of the adapter slot at `(layer, location)`, if declared and active.
    pub fn adapter_up(&self, active: &ActiveLayers, layer: usize, location: Location) -> Option<&Arc<Graph>> {
        if active.0[layer] { self.up.get(&(layer, location)) } else { None }
    }
}

/// Loads an adapter slot's optional `up` graph (shared by content with fusion tasks' adapter files).
/// Only valid for adapters whose slot is `y = LN(up + h + x)` (residual_before_ln, original_ln_after);
/// the exporter writes `up` only for those.
pub fn load_up(runtime: &Runtime, dir: &Path, spec: &SlotSpec, hidden: usize) -> Result<Option<Arc<Graph>>, LoadError> {
    let Some(up) = &spec.up else { return Ok(None) };
    if spec.kind == SlotKind::Fusion || !inside(up) {
        let why = format!(
            "slot at layer {} {}: `up` graph `{up}` must stay inside the task directory and belongs to adapter slots only",
            spec.layer,
            spec.location.as_str()
        );
        return Err(LoadError::new(dir.join("task.json"), why));
    }
    let bth = [Dim::Any, Dim::Any, Dim::Fixed(hidden as i64)];
    let hx = [IoSpec::new("h", T::Float32, &bth), IoSpec::new("x", T::Float32, &bth)];
    load_shared(runtime, &dir.join(up), &hx, &[IoSpec::new("up", T::Float32, &bth)]).map(Some)
}

/// Loads `path` once per runtime for a given content: later loads of a file with the same bytes get
/// the already loaded graph (while any task still holds it).
pub fn load_shared(runtime: &Runtime, path: &Path, inputs: &[IoSpec], outputs: &[IoSpec]) -> Result<Arc<Graph>, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::new(path, format!("cannot read: {e}")))?;
    let key = content_key(&bytes);
    let cache = runtime.graph_cache();
    if let Some(g) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key).and_then(Weak::upgrade) {
        // Same bytes, so same I/O; still check the contract (it may differ, e.g. another hidden size).
        g.check_contract(path, inputs, outputs)?;
        return Ok(g);
    }
    let g = Arc::new(Graph::load(runtime, path, inputs, outputs)?);
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    // Start-up loads tasks on several threads: another may have loaded the same bytes meanwhile.
    if let Some(first) = map.get(&key).and_then(Weak::upgrade) {
        return Ok(first);
    }
    map.retain(|_, w| w.strong_count() > 0);
    map.insert(key, Arc::downgrade(&g));
    Ok(g)
}

/// Two independent 64-bit SipHashes of the bytes plus their length.
fn content_key(bytes: &[u8]) -> ContentKey {
    let mut a = DefaultHasher::new();
    bytes.hash(&mut a);
    let mut b = DefaultHasher::new();
    0x9e37_79b9_7f4a_7c15u64.hash(&mut b);
    bytes.hash(&mut b);
    (a.finish(), b.finish(), bytes.len())
}
