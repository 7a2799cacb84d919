//! A loaded task: adapter slot graphs, head, and its AdapterDrop policy.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ort::value::TensorElementType as T;

use super::adapterhub::{self, AdapterWeights};
use super::backbone::{Backbone, slot_contract};
use super::fusion::{FusionSlot, SlotKind, load_up};
use super::manifest::{DropSpec, FORMAT_VERSION, HeadKind, Location, TaskManifest, read_json, valid_name};
use crate::engine::banks::{BankRows, BankWrite, StackWrite};
use crate::error::{LoadError, ServeError};
use crate::runtime::{Dim, Graph, IoSpec, Runtime};

#[derive(Debug)]
pub struct Task {
    pub manifest: TaskManifest,
    pub backbone: Arc<Backbone>,
    /// Adapter graphs by (layer, location). Slots in layers the task always drops are not loaded.
    pub slots: BTreeMap<(usize, Location), Arc<Graph>>,
    /// AdapterFusion slots by (layer, location), same drop rule as `slots`.
    pub fusion: BTreeMap<(usize, Location), Arc<FusionSlot>>,
    /// Optional output graphs `(h, x) -> up` of adapter slots, for sharing with fusions.
    pub up: BTreeMap<(usize, Location), Arc<Graph>>,
    /// The head graph; None for a weights-only task (its head is `adapterhub`'s, run on the host).
    pub head: Option<Graph>,
    /// The AdapterHub weights the task was exported from (`task.json` key `adapterhub`), validated
    /// against the backbone and the task's own slots and head: what the adapter banks load (for a
    /// bank task the bottleneck weights live in the banks and `slots` is empty here).
    pub adapterhub: Option<Arc<AdapterWeights>>,
    /// The task's rows in its backbone's adapter banks, when it has AdapterHub weights, the
    /// backbone has layer graphs and the task is not a fusion; such a task runs on the bank path
    /// with its head computed on the host from `adapterhub`.
    pub bank: Option<TaskBank>,
}

/// A bank task's handle on its rows: freed when the last holder of the task version drops it.
#[derive(Debug)]
pub struct TaskBank {
    pub rows: Arc<BankRows>,
}

/// The adapter layout one request runs with: which layers keep the task's adapters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActiveLayers(pub Vec<bool>);

impl ActiveLayers {
    pub fn dropped(&self) -> Vec<u32> {
        self.0.iter().enumerate().filter(|(_, a)| !**a).map(|(i, _)| i as u32).collect()
    }
}

impl Task {
    pub fn load(runtime: &Runtime, dir: &Path, backbone: Arc<Backbone>) -> Result<Self, LoadError> {
        let manifest_path = dir.join("task.json");
        let manifest: TaskManifest = read_json(&manifest_path)?;
        validate_manifest(&manifest, &manifest_path, dir, &backbone)?;
        let needed = needed_layers(&manifest.drop, backbone.num_layers());
        let (slot_in, slot_out) = slot_contract(backbone.manifest.hidden_size);
        let mut slots = BTreeMap::new();
        let mut fusion = BTreeMap::new();
        let mut up = BTreeMap::new();
        for spec in &manifest.slots {
            if !needed[spec.layer] {
                continue;
            }
            if spec.kind == SlotKind::Fusion {
                let f = FusionSlot::load(runtime, dir, spec, backbone.manifest.hidden_size)?;
                fusion.insert((spec.layer, spec.location), Arc::new(f));
                continue;
            }
            let graph = Graph::load(runtime, &dir.join(&spec.graph), &slot_in, &slot_out)?;
            if let Some(g) = load_up(runtime, dir, spec, backbone.manifest.hidden_size)? {
                up.insert((spec.layer, spec.location), g);
            }
            slots.insert((spec.layer, spec.location), Arc::new(graph));
        }
        let h = backbone.manifest.hidden_size as i64;
        let width = manifest.head.width() as i64;
        let head = match &manifest.head.graph {
            None => None,
            Some(graph) => Some(Graph::load(
                runtime,
                &dir.join(graph),
                &[IoSpec::new("hidden", T::Float32, &[Dim::Any, Dim::Any, Dim::Fixed(h)])],
                &[IoSpec::new("logits", T::Float32, &[Dim::Any, Dim::Fixed(width)])],
            )?),
        };
        let adapterhub = match &manifest.adapterhub {
            None => None,
            Some(rel) => Some(Arc::new(load_adapterhub(&manifest, &manifest_path, &dir.join(rel), &backbone, &needed)?)),
        };
        let mut task = Self { manifest, backbone, slots, fusion, up, head, adapterhub: None, bank: None };
        if let Some(w) = adapterhub {
            task.attach_bank(w);
        }
        Ok(task)
    }

    /// Sets the task's AdapterHub weights and moves their bottleneck weights into its backbone's
    /// banks (slots of layers its drop policy always skips are left out), so they are held once:
    /// a bank task's `adapterhub` keeps its rule, head and `leave_out`, with `slots` empty. Without
    /// layer graphs, or for a fusion task, the task stays on the per-task path and keeps them all.
    pub fn attach_bank(&mut self, weights: Arc<AdapterWeights>) {
        let mut w = Arc::try_unwrap(weights).unwrap_or_else(|shared| (*shared).clone());
        self.bank = None;
        if let (Some(banked), true) = (&self.backbone.banked, self.fusion.is_empty()) {
            let needed = needed_layers(&self.manifest.drop, self.backbone.num_layers());
            let need = |layer: &usize| needed.get(*layer).copied().unwrap_or(false);
            let slots = std::mem::take(&mut w.slots).into_iter().filter(|((layer, _), _)| need(layer)).collect();
            let methods = std::mem::take(&mut w.methods).into_iter().filter(|(layer, _)| need(layer)).collect();
            // A Stack's lower adapter goes into the stack banks; its invertible adapter stays here.
            let stack = w.stack.as_mut().map(|lower| StackWrite {
                rule: lower.rule,
                slots: std::mem::take(&mut lower.slots).into_iter().filter(|((layer, _), _)| need(layer)).collect(),
            });
            self.bank = Some(TaskBank { rows: banked.banks.register(BankWrite { rule: w.rule, slots, methods, stack }) });
        }
        self.adapterhub = Some(Arc::new(w));
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    pub fn version(&self) -> u32 {
        self.manifest.version
    }

    /// Resolves the request's drop override against the task's policy.
    pub fn active_layers(&self, drop_first: Option<u32>) -> Result<ActiveLayers, ServeError> {
        self.runnable()?;
        let layers = self.backbone.num_layers();
        let dropped: Vec<bool> = match (&self.manifest.drop, drop_first) {
            (DropSpec::Robust(r), requested) => {
                let n = requested.map(|n| n as usize).unwrap_or(r.default);
                if n < r.min || n > r.max {
                    return Err(ServeError::InvalidArgument(format!(
                        "drop_first = {n} is outside task `{}`'s robust range {}..={}",
                        self.name(),
                        r.min,
                        r.max
                    )));
                }
                (0..layers).map(|i| i < n).collect()
            }
            (spec, Some(n)) => {
                let own = match spec {
                    DropSpec::DropFirst(own) => Some(*own),
                    _ => None,
                };
                if own != Some(n as usize) {
                    return Err(ServeError::InvalidArgument(format!(
                        "task `{}` is not robust (its drop config is fixed: {}); omit drop_first",
                        self.name(),
                        describe_drop(spec)
                    )));
                }
                (0..layers).map(|i| i < n as usize).collect()
            }
            (DropSpec::DropFirst(n), None) => (0..layers).map(|i| i < *n).collect(),
            (DropSpec::Layers(l), None) => (0..layers).map(|i| l.contains(&i)).collect(),
        };
        Ok(ActiveLayers(dropped.into_iter().map(|d| !d).collect()))
    }

    /// A weights-only task has no slot graphs: only the adapter banks can run it (whatever
    /// `engine.banks` says), so without them (a backbone exported before layer graphs) requests
    /// are refused rather than run without adapters.
    pub fn runnable(&self) -> Result<(), ServeError> {
        if self.manifest.weights_only() && self.manifest.head.kind != HeadKind::Embedding && self.bank.is_none() {
            return Err(ServeError::FailedPrecondition(format!(
                "task `{}` was registered from AdapterHub weights only, and its backbone `{}` has no layer graphs \
                 (layers/<i>/layer.onnx) to run adapter banks: re-export the backbone with tools/export_backbone.py, \
                 or register the exported bundle (tools/register_task.py register --adapter)",
                self.name(),
                self.backbone.name()
            )));
        }
        Ok(())
    }

    /// The adapter graph for a slot, if the task has one there and it is active.
    pub fn slot(&self, active: &ActiveLayers, layer: usize, location: Location) -> Option<&Arc<Graph>> {
        if active.0[layer] { self.slots.get(&(layer, location)) } else { None }
    }
}

pub fn describe_drop(spec: &DropSpec) -> String {
    match spec {
        DropSpec::DropFirst(n) => format!("drop_first = {n}"),
        DropSpec::Layers(l) => format!("layers {l:?}"),
        DropSpec::Robust(r) => format!("robust {}..={} (default {})", r.min, r.max, r.default),
    }
}

/// Parses the task's AdapterHub directory and checks it says what the task's graphs say: the same
/// adapter slots in every layer the drop policy can use, the same head kind and labels.
fn load_adapterhub(
    m: &TaskManifest,
    manifest_path: &Path,
    dir: &Path,
    backbone: &Backbone,
    needed: &[bool],
) -> Result<AdapterWeights, LoadError> {
    let w = adapterhub::load_for(dir, &backbone.manifest)?;
    if m.composition.is_some() != w.stack.is_some() || (w.stack.is_some() && !m.weights_only()) {
        return Err(LoadError::new(
            manifest_path,
            format!(
                "composition {:?} does not match the AdapterHub directory (a Stack is a weights-only task with its lower adapter under {}/)",
                m.composition,
                adapterhub::stack::STACK_DIR
            ),
        ));
    }
    let in_use = |keys: Vec<(usize, Location)>| keys.into_iter().filter(|(l, _)| needed[*l]).collect::<std::collections::BTreeSet<_>>();
    let graphs = in_use(m.slots.iter().map(|s| (s.layer, s.location)).collect());
    let weights = in_use(w.slots.keys().copied().collect());
    if !m.weights_only() && (w.rule.parallel || !w.methods.is_empty()) {
        return Err(LoadError::new(
            dir.join(adapterhub::ADAPTER_CONFIG),
            format!("a {} adapter is served on the adapter banks only: register it weights-only, without slot graphs", w.method),
        ));
    }
    if m.weights_only() {
        let has = |l: usize| weights.iter().any(|(wl, _)| *wl == l) || w.methods.contains_key(&l);
        if let Some(layer) = (0..needed.len()).find(|&l| needed[l] && !has(l)) {
            return Err(LoadError::new(
                dir.join(adapterhub::ADAPTER_CONFIG),
                format!("layer {layer} is not dropped by {} but the adapter leaves it out (leave_out)", describe_drop(&m.drop)),
            ));
        }
    } else if graphs != weights {
        let show = |s: &std::collections::BTreeSet<(usize, Location)>| {
            s.iter().map(|(l, loc)| format!("{l}:{}", loc.as_str())).collect::<Vec<_>>()
        };
        return Err(LoadError::new(
            manifest_path,
            format!(
                "the slots {:?} differ from those of the AdapterHub adapter in `{}`: {:?}",
                show(&graphs),
                dir.display(),
                show(&weights)
            ),
        ));
    }
    let labels = m.head.label_names().to_vec();
    if w.head.kind != m.head.kind || w.head.labels != labels {
        return Err(LoadError::new(
            manifest_path,
            format!(
                "head {} {:?} differs from the AdapterHub head in `{}`: {} {:?}",
                m.head.kind.as_str(),
                labels,
                dir.display(),
                w.head.kind.as_str(),
                w.head.labels
            ),
        ));
    }
    Ok(w)
}

/// Layers whose adapters can ever be active under the drop policy.
fn needed_layers(drop: &DropSpec, layers: usize) -> Vec<bool> {
    (0..layers)
        .map(|i| match drop {
            DropSpec::DropFirst(n) => i >= *n,
            DropSpec::Layers(l) => !l.contains(&i),
            DropSpec::Robust(r) => i >= r.min,
        })
        .collect()
}

fn validate_manifest(m: &TaskManifest, path: &Path, dir: &Path, backbone: &Backbone) -> Result<(), LoadError> {
    let bad = |problem: String| Err(LoadError::new(path, problem));
    if m.format_version != FORMAT_VERSION {
        return bad(format!("format_version {} is not supported (expected {FORMAT_VERSION})", m.format_version));
    }
    if !valid_name(&m.name) {
        return bad(format!("task name `{}` is not valid ([A-Za-z0-9][A-Za-z0-9_.-]{{0,63}})", m.name));
    }
    let task_dir = dir.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    let version_dir = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    if task_dir.as_deref() != Some(m.name.as_str()) || version_dir != Some(m.version.to_string()) || m.version == 0 {
        return bad(format!("name `{}` and version {} must match the directory tasks/<name>/<version> (version >= 1)", m.name, m.version));
    }
    let layers = backbone.num_layers();
    match &m.drop {
        DropSpec::DropFirst(n) if *n > layers => return bad(format!("drop_first = {n} exceeds the backbone's {layers} layers")),
        DropSpec::Layers(l) if l.iter().any(|&i| i >= layers) => {
            return bad(format!("drop layers {l:?} name a layer >= {layers} (the backbone's layer count)"));
        }
        DropSpec::Robust(r) if !(r.min <= r.default && r.default <= r.max && r.max <= layers) => {
            return bad(format!("robust range needs min <= default <= max <= {layers}, got {r:?}"));
        }
        _ => {}
    }
    let mut seen = std::collections::BTreeSet::new();
    for s in &m.slots {
        if s.layer >= layers {
            return bad(format!("slot {} at layer {} but the backbone has {layers} layers", s.graph, s.layer));
        }
        if !backbone.manifest.slots.contains(&s.location) {
            return bad(format!("slot location `{}` is not offered by backbone `{}`", s.location.as_str(), backbone.name()));
        }
        if !seen.insert((s.layer, s.location)) {
            return bad(format!("two slots at layer {} {}", s.layer, s.location.as_str()));
        }
        if s.graph.contains("..") || Path::new(&s.graph).is_absolute() {
            return bad(format!("slot graph path `{}` must stay inside the task directory", s.graph));
        }
        if s.kind == SlotKind::Fusion && s.up.is_some() {
            return bad(format!("fusion slot {} has an `up` graph; `up` belongs to adapter slots", s.graph));
        }
        if s.kind == SlotKind::Adapter && !s.adapters.is_empty() {
            return bad(format!("slot {} lists `adapters` but is not `\"kind\": \"fusion\"`", s.graph));
        }
    }
    if m.weights_only() && (m.adapterhub.is_none() || !m.slots.is_empty()) {
        return bad("a task without a head graph must be weights-only: `adapterhub` set and no `slots`".into());
    }
    let needed = needed_layers(&m.drop, layers);
    for (layer, need) in needed.iter().enumerate() {
        if *need && !m.weights_only() && !m.slots.iter().any(|s| s.layer == layer) {
            return bad(format!("layer {layer} is not dropped by {} but the task has no adapter slot there", describe_drop(&m.drop)));
        }
    }
    if let Some(a) = &m.adapterhub
        && (a.contains("..") || Path::new(a).is_absolute() || a.is_empty())
    {
        return bad(format!("adapterhub directory `{a}` must be a path inside the task directory"));
    }
    if m.adapterhub.is_some() && m.slots.iter().any(|s| s.kind == SlotKind::Fusion) {
        return bad("`adapterhub` is for single-adapter tasks; a fusion task is served from its graphs only".into());
    }
    if let Some(g) = &m.head.graph
        && (g.contains("..") || Path::new(g).is_absolute())
    {
        return bad(format!("head graph path `{g}` must stay inside the task directory"));
    }
    if matches!(m.head.kind, HeadKind::Classification | HeadKind::Tagging | HeadKind::MultiLabel) && m.head.labels.is_empty() {
        return bad(format!("a {} head needs at least one label name", m.head.kind.as_str()));
    }
    if m.head.kind == HeadKind::Embedding {
        return bad(format!("head type `embedding` is built in (`<backbone>{}`); a task cannot declare it", super::embedding::SUFFIX));
    }
    if let Some(t) = m.head.threshold
        && (m.head.kind != HeadKind::MultiLabel || !(0.0..=1.0).contains(&t))
    {
        return bad(format!("head threshold {t}: only a multilabel head has one, within 0..=1"));
    }
    if m.head.kind.per_token() && (m.head.graph.is_some() || m.adapterhub.is_none()) {
        return bad(format!(
            "a {} head runs from AdapterHub weights on the host: give `adapterhub` and no head graph",
            m.head.kind.as_str()
        ));
    }
    if m.head.kind == HeadKind::Regression && m.head.labels.len() > 1 {
        return bad("a regression head has one output; give at most one label".into());
    }
    Ok(())
}
