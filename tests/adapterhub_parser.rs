//! The Rust AdapterHub parser reads every adapter directory the project has exactly as the Python
//! exporter does (bit-identical weights, same rule, labels and leave_out), and refuses broken or
//! unsupported directories with a message naming the file and the problem.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use adapterdrop_serve::repository::adapterhub::{self, AdapterHubError, AdapterWeights, Residual, safetensors};
use adapterdrop_serve::repository::manifest::{HeadKind, Location};

fn python() -> PathBuf {
    std::env::var_os("ADAPTERDROP_PYTHON").map(PathBuf::from).unwrap_or_else(|| common::root().join(".venv/bin/python"))
}

/// What `tools/adapterdrop_tools/adapterhub.py` reads from `dir`: tensors in a safetensors file
/// (`<layer>.<loc>.<param>`, `head.<param>`) and the rest as JSON in its metadata-free sibling.
fn python_reading(dir: &Path, layers: usize, hidden: usize, out: &Path) -> serde_json::Value {
    const SCRIPT: &str = r#"
import json, sys
import numpy as np
from safetensors.numpy import save_file
from adapterdrop_tools.adapterhub import load_adapter, load_head
d, L, H, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
a, h = load_adapter(d, L, H), load_head(d, H)
t = {}
for (layer, loc), sw in a.slots.items():
    for p in ("down_w", "down_b", "up_w", "up_b"):
        t[f"{layer}.{loc}.{p}"] = np.ascontiguousarray(getattr(sw, p), np.float32)
for p in ("w1", "b1", "w2", "b2"):
    t[f"head.{p}"] = np.ascontiguousarray(getattr(h, p), np.float32)
save_file(t, out)
print(json.dumps({"name": a.name, "method": a.method, "act": a.non_linearity, "lnb": a.original_ln_before,
                  "lna": a.original_ln_after, "res": a.residual_before_ln, "scaling": a.scaling,
                  "leave_out": a.leave_out, "kind": h.kind, "labels": h.labels}))
"#;
    let o = Command::new(python())
        .env("PYTHONPATH", common::root().join("tools"))
        .args(["-c", SCRIPT])
        .arg(dir)
        .args([layers.to_string(), hidden.to_string()])
        .arg(out)
        .output()
        .expect("run the venv python (make setup)");
    assert!(o.status.success(), "python reader failed on {}: {}", dir.display(), String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn assert_same(dir: &Path, layers: usize, hidden: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("py.safetensors");
    let meta = python_reading(dir, layers, hidden, &out);
    let py = safetensors::parse(&std::fs::read(&out).unwrap()).unwrap();
    let rs = adapterhub::load(dir, layers, hidden).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let what = dir.display();
    assert_eq!(meta["name"], rs.name, "{what}");
    assert_eq!(meta["method"], rs.method.as_str(), "{what}");
    assert_eq!(meta["act"], rs.rule.activation.as_str(), "{what}");
    assert_eq!(meta["lnb"], rs.rule.ln_before, "{what}");
    assert_eq!(meta["lna"], rs.rule.ln_after, "{what}");
    let res = match rs.rule.residual {
        Residual::H => serde_json::json!(true),
        Residual::U => serde_json::json!(false),
        Residual::HPlusX => serde_json::json!("post_add"),
    };
    assert_eq!(meta["res"], res, "{what}");
    assert_eq!(meta["scaling"].as_f64().unwrap() as f32, rs.rule.scaling, "{what}");
    assert_eq!(meta["leave_out"], serde_json::json!(rs.leave_out), "{what}");
    assert_eq!(meta["kind"], rs.head.kind.as_str(), "{what}");
    assert_eq!(meta["labels"], serde_json::json!(rs.head.labels), "{what}");
    let mut seen = 0;
    for ((layer, loc), w) in &rs.slots {
        for (p, shape, data) in [
            ("down_w", w.down_w.shape(), w.down_w.as_slice().unwrap()),
            ("down_b", w.down_b.shape(), w.down_b.as_slice().unwrap()),
            ("up_w", w.up_w.shape(), w.up_w.as_slice().unwrap()),
            ("up_b", w.up_b.shape(), w.up_b.as_slice().unwrap()),
        ] {
            let t = &py[&format!("{layer}.{}.{p}", loc.as_str())];
            assert_eq!(t.shape, shape, "{what} {layer} {loc:?} {p}");
            assert!(bits(&t.data) == bits(data), "{what} {layer} {loc:?} {p}: values differ");
            seen += 1;
        }
    }
    assert_eq!(seen + 4, py.len(), "{what}: Python reads slots the Rust parser does not");
    let h = &rs.head;
    assert_eq!(h.layers.len(), 2, "{what}: the Python reader reads two-layer heads");
    for (p, data) in [
        ("w1", h.layers[0].w.as_slice().unwrap()),
        ("b1", h.layers[0].b.as_slice().unwrap()),
        ("w2", h.layers[1].w.as_slice().unwrap()),
        ("b2", h.layers[1].b.as_slice().unwrap()),
    ] {
        assert!(bits(&py[&format!("head.{p}")].data) == bits(data), "{what} head {p}: values differ");
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Whether a directory's head is a token head, which the Python exporter does not read (token heads
/// are served weights-only; `token_heads_and_deeper_heads_are_read_as_the_library_lays_them_out`
/// and `tests/python/test_trained_tagging.py` cover them).
fn token_head(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("head_config.json")) else { return false };
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    matches!(cfg["config"]["head_type"].as_str().or(cfg["head_type"].as_str()), Some("tagging" | "question_answering"))
}

/// (adapter dir, layers, hidden) of every AdapterHub adapter directory with a sequence head the
/// project holds or builds.
fn adapter_dirs() -> Vec<(PathBuf, usize, usize)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(common::root().join("models/trained")).unwrap() {
        let p = e.unwrap().path();
        if p.join("adapter_config.json").is_file() && !token_head(&p) {
            out.push((p, 6, 384));
        }
    }
    let repo = common::test_repo();
    for backbone in ["tiny-random", "minilm"] {
        let Ok(entries) = std::fs::read_dir(repo.join("sources").join(backbone).join("adapters")) else { continue };
        let bb: serde_json::Value =
            serde_json::from_slice(&std::fs::read(repo.join("backbones").join(backbone).join("backbone.json")).unwrap()).unwrap();
        for e in entries {
            out.push((e.unwrap().path(), bb["num_layers"].as_u64().unwrap() as usize, bb["hidden_size"].as_u64().unwrap() as usize));
        }
    }
    // Bundles of the test and breadth repositories carry their AdapterHub files (bert-tiny,
    // roberta-tiny, and XLM-R, DistilBERT, ELECTRA key layouts).
    let breadth = common::root().join("build/breadth-repo");
    for repo in std::iter::once(repo).chain(breadth.join("tasks").is_dir().then_some(breadth)) {
        for task in std::fs::read_dir(repo.join("tasks")).unwrap() {
            let dir = task.unwrap().path().join("1");
            let Ok(m) = std::fs::read(dir.join("task.json")) else { continue };
            let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
            let Some(rel) = m.get("adapterhub").and_then(|a| a.as_str()) else { continue };
            let bb: serde_json::Value = serde_json::from_slice(
                &std::fs::read(repo.join("backbones").join(m["backbone"].as_str().unwrap()).join("backbone.json")).unwrap(),
            )
            .unwrap();
            out.push((dir.join(rel), bb["num_layers"].as_u64().unwrap() as usize, bb["hidden_size"].as_u64().unwrap() as usize));
        }
    }
    out
}

#[test]
fn reads_every_adapter_exactly_as_the_python_exporter() {
    let dirs = adapter_dirs();
    assert!(dirs.len() >= 12, "expected the trained adapters and the test sources, found {}", dirs.len());
    let mut rules = std::collections::BTreeSet::new();
    for (dir, layers, hidden) in &dirs {
        assert_same(dir, *layers, *hidden);
        let w = adapterhub::load(dir, *layers, *hidden).unwrap();
        rules.insert((w.method.clone(), w.rule.activation.as_str(), format!("{:?}", w.rule.residual), w.head.kind.as_str()));
    }
    // The set covers Pfeiffer and Houlsby, several activations, and both head kinds.
    assert!(rules.iter().any(|r| r.0 == "seq_bn") && rules.iter().any(|r| r.0 == "double_seq_bn"), "{rules:?}");
    assert!(rules.iter().map(|r| r.1).collect::<std::collections::BTreeSet<_>>().len() >= 2, "{rules:?}");
}

/// A writable copy of a trained adapter directory.
fn copy_of_trained(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in adapterhub::FILES {
        std::fs::copy(common::root().join("models/trained").join(name).join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn edit_tensors(path: &Path, edit: impl FnOnce(&mut BTreeMap<String, safetensors::Tensor>)) {
    let mut t = safetensors::parse(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut t);
    std::fs::write(path, safetensors::serialize(&t)).unwrap();
}

fn refused(dir: &Path, layers: usize, hidden: usize) -> String {
    let e: AdapterHubError = adapterhub::load(dir, layers, hidden).expect_err("must be refused");
    e.to_string()
}

#[test]
fn broken_and_unsupported_directories_are_refused_with_the_file_named() {
    let ffn0 = "bert.encoder.layer.0.output.adapters.sentiment-robust.adapter_down.0.weight";
    type Case = (&'static str, Box<dyn Fn(&Path)>, &'static str);
    let cases: Vec<Case> = vec![
        (
            "nan",
            Box::new(move |d: &Path| edit_tensors(&d.join("adapter.safetensors"), |t| t.get_mut(ffn0).unwrap().data[5] = f32::NAN)),
            "must be finite",
        ),
        (
            "shape",
            Box::new(move |d: &Path| {
                edit_tensors(&d.join("adapter.safetensors"), |t| {
                    let w = t.get_mut(ffn0).unwrap();
                    w.shape = vec![w.shape[1], w.shape[0]];
                })
            }),
            "shape [384, 24] != expected [24, 384]",
        ),
        ("missing", Box::new(move |d: &Path| edit_tensors(&d.join("adapter.safetensors"), |t| drop(t.remove(ffn0)))), "not found"),
        (
            "gating",
            Box::new(|d: &Path| edit_json(&d.join("adapter_config.json"), |v| v["config"]["use_gating"] = true.into())),
            "use_gating",
        ),
        ("hidden", Box::new(|d: &Path| edit_json(&d.join("adapter_config.json"), |v| v["hidden_size"] = 768.into())), "768"),
        (
            "head",
            Box::new(|d: &Path| edit_json(&d.join("head_config.json"), |v| v["config"]["head_type"] = "dependency_parsing".into())),
            "head_type",
        ),
        (
            "labels",
            Box::new(|d: &Path| edit_json(&d.join("head_config.json"), |v| v["config"]["num_labels"] = 3.into())),
            "label2id has 2 labels",
        ),
        (
            "truncated",
            Box::new(|d: &Path| std::fs::write(d.join("model_head.safetensors"), b"\x10\0\0\0\0\0\0\0{").unwrap()),
            "not a valid safetensors",
        ),
        (
            "extra",
            Box::new(|d: &Path| {
                edit_tensors(&d.join("adapter.safetensors"), |t| {
                    let w = t["bert.encoder.layer.0.output.adapters.sentiment-robust.adapter_up.bias"].clone();
                    t.insert("bert.encoder.layer.9.output.adapters.sentiment-robust.adapter_up.bias".into(), w);
                })
            }),
            "layer 9",
        ),
        (
            "pickle",
            Box::new(|d: &Path| {
                std::fs::rename(d.join("adapter.safetensors"), d.join("pytorch_adapter.bin")).unwrap();
            }),
            "safetensors only",
        ),
    ];
    for (what, edit, want) in cases {
        let dir = copy_of_trained("sentiment-robust");
        edit(dir.path());
        let msg = refused(dir.path(), 6, 384);
        assert!(msg.contains(want), "{what}: {msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{what}: the message must name the file: {msg}");
    }
    // A backbone with fewer layers than the adapter has weights for.
    let dir = copy_of_trained("sentiment-robust");
    assert!(refused(dir.path(), 4, 384).contains("layer 4"));
}

#[test]
fn leave_out_and_locations_decide_the_slots() {
    let dir = copy_of_trained("sentiment-houlsby");
    let full: AdapterWeights = adapterhub::load(dir.path(), 6, 384).unwrap();
    assert_eq!(full.slots.len(), 12);
    assert!(full.slots.contains_key(&(0, Location::Attention)));
    assert_eq!(full.head.kind, HeadKind::Classification);
    edit_json(&dir.path().join("adapter_config.json"), |v| v["config"]["leave_out"] = serde_json::json!([0, 1]));
    edit_tensors(&dir.path().join("adapter.safetensors"), |t| t.retain(|k, _| !k.contains("layer.0.") && !k.contains("layer.1.")));
    let left = adapterhub::load(dir.path(), 6, 384).unwrap();
    assert_eq!(left.leave_out, vec![0, 1]);
    assert_eq!(left.slots.len(), 8);
    assert_eq!(left.slots[&(2, Location::Ffn)], full.slots[&(2, Location::Ffn)]);
}

/// The library's head layouts: a tagging and a QA head (`add_tagging_head`, `add_qa_head`: one
/// linear layer, at module index 1) and a classification head with `layers` changed to 3 (linear
/// layers at 1, 4, 7; 1, 3, 5 without an activation).
#[test]
fn token_heads_and_deeper_heads_are_read_as_the_library_lays_them_out() {
    let fixtures = common::root().join("tests/fixtures/adapterhub-breadth/bert/adapters");
    let tag = adapterhub::load(&fixtures.join("tagging"), 3, 32).unwrap().head;
    assert_eq!((tag.kind, tag.layers.len(), tag.width()), (HeadKind::Tagging, 1, 5));
    assert_eq!(tag.labels, ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]);
    let qa = adapterhub::load(&fixtures.join("qa"), 3, 32).unwrap().head;
    assert_eq!((qa.kind, qa.layers.len(), qa.width(), qa.labels.len()), (HeadKind::QuestionAnswering, 1, 2, 0));

    let deeper = |activation: serde_json::Value, linear_at: [usize; 3]| {
        let tmp = tempfile::tempdir().unwrap();
        for f in adapterhub::FILES {
            std::fs::copy(fixtures.join("pfeiffer").join(f), tmp.path().join(f)).unwrap();
        }
        edit_json(&tmp.path().join("head_config.json"), |v| {
            v["config"]["layers"] = 3.into();
            v["config"]["activation_function"] = activation.clone();
        });
        edit_tensors(&tmp.path().join("model_head.safetensors"), |t| {
            let (w1, b1) = (t["heads.pfeiffer.1.weight"].clone(), t["heads.pfeiffer.1.bias"].clone());
            let (w2, b2) = (t.remove("heads.pfeiffer.4.weight").unwrap(), t.remove("heads.pfeiffer.4.bias").unwrap());
            t.retain(|_, _| false);
            for (i, (w, b)) in linear_at.iter().zip([(w1.clone(), b1.clone()), (w1, b1), (w2, b2)]) {
                t.insert(format!("heads.pfeiffer.{i}.weight"), w);
                t.insert(format!("heads.pfeiffer.{i}.bias"), b);
            }
        });
        adapterhub::load(tmp.path(), 3, 32)
    };
    let h = deeper("relu".into(), [1, 4, 7]).unwrap().head;
    assert_eq!((h.layers.len(), h.width(), h.activation), (3, 2, Some(adapterhub::Activation::Relu)));
    let h = deeper(serde_json::Value::Null, [1, 3, 5]).unwrap().head;
    assert_eq!((h.layers.len(), h.activation), (3, None));
    // The indices of the other layout are not found: the message names the missing key.
    let e = deeper("tanh".into(), [1, 3, 5]).unwrap_err().to_string();
    assert!(e.contains("key 'heads.pfeiffer.4.weight' not found"), "{e}");
    let e = deeper("gelu_new".into(), [1, 4, 7]).unwrap_err().to_string();
    assert!(e.contains("activation_function=\"gelu_new\" is not supported"), "{e}");
}
