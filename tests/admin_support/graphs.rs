//! Hostile and broken task graphs, written as ONNX protobuf from Rust (`repository::onnx_proto`):
//! each has exactly the I/O contract of its slot, so only the upload checks or the trial run can
//! refuse it. Hidden size 32 and two labels, as the test repository's bert-tiny tasks.

use adapterdrop_serve::repository::onnx_proto::build::*;
use adapterdrop_serve::repository::onnx_proto::data_type::{BOOL, FLOAT, INT64};
use adapterdrop_serve::repository::onnx_proto::{GraphProto, NodeProto, TensorProto, ValueInfoProto};

pub const H: i64 = 32;

fn bth(name: &str) -> ValueInfoProto {
    value(name, FLOAT, Some(&[None, None, Some(H)]))
}

fn graph(
    name: &str,
    node: Vec<NodeProto>,
    initializer: Vec<TensorProto>,
    input: Vec<ValueInfoProto>,
    output: Vec<ValueInfoProto>,
) -> Vec<u8> {
    encode(&model(GraphProto { node, name: name.into(), initializer, input, output, sparse_initializer: vec![] }))
}

/// A head `hidden [B,T,H] -> logits [B,2]` whose first token goes through `middle` (which reads
/// `first` [B,H] and writes `mid` [B,H]) before the output projection.
fn head_around(middle: Vec<NodeProto>, mut inits: Vec<TensorProto>) -> Vec<u8> {
    let mut nodes = vec![node("Gather", &["hidden", "zero"], &["first"], vec![int_attr("axis", 1)])];
    nodes.extend(middle);
    nodes.push(node("MatMul", &["mid", "w_out"], &["logits"], vec![]));
    inits.push(int64s("zero", &[], &[0]));
    inits.push(floats("w_out", &[H, 2], &[0.01; 64]));
    graph("head", nodes, inits, vec![bth("hidden")], vec![value("logits", FLOAT, Some(&[None, Some(2)]))])
}

/// A head that runs a `Loop` of 10^12 steps (3.5 KB in the red-team report): never finishes.
pub fn loop_head() -> Vec<u8> {
    let body = GraphProto {
        node: vec![node("Identity", &["cond_in"], &["cond_out"], vec![]), node("Add", &["v_in", "one"], &["v_out"], vec![])],
        name: "body".into(),
        initializer: vec![floats("one", &[], &[1.0])],
        input: vec![value("i", INT64, Some(&[])), value("cond_in", BOOL, Some(&[])), value("v_in", FLOAT, None)],
        output: vec![value("cond_out", BOOL, Some(&[])), value("v_out", FLOAT, None)],
        sparse_initializer: vec![],
    };
    head_around(
        vec![node("Loop", &["trips", "", "first"], &["mid"], vec![graph_attr("body", body)])],
        vec![int64s("trips", &[], &[1_000_000_000_000])],
    )
}

/// A head that tiles its input 100,000 times along the tokens (gigabytes at serving sizes).
pub fn tile_head() -> Vec<u8> {
    let mut nodes = vec![node("Tile", &["hidden", "reps"], &["tiled"], vec![])];
    nodes.push(node("Gather", &["tiled", "zero"], &["first"], vec![int_attr("axis", 1)]));
    nodes.push(node("MatMul", &["first", "w_out"], &["logits"], vec![]));
    let inits = vec![int64s("reps", &[3], &[1, 100_000, 1]), int64s("zero", &[], &[0]), floats("w_out", &[H, 2], &[0.01; 64])];
    graph("head", nodes, inits, vec![bth("hidden")], vec![value("logits", FLOAT, Some(&[None, Some(2)]))])
}

/// Only allowed operators, but an `Add` that broadcasts the input to 1000 copies of itself.
pub fn broadcast_head() -> Vec<u8> {
    let mut nodes = vec![node("Add", &["hidden", "copies"], &["wide"], vec![])];
    nodes.push(node("Gather", &["wide", "zero"], &["back"], vec![int_attr("axis", 0)]));
    nodes.push(node("Gather", &["back", "zero"], &["first"], vec![int_attr("axis", 1)]));
    nodes.push(node("MatMul", &["first", "w_out"], &["logits"], vec![]));
    let inits = vec![floats("copies", &[1000, 1, 1, 1], &[0.0; 1000]), int64s("zero", &[], &[0]), floats("w_out", &[H, 2], &[0.01; 64])];
    graph("head", nodes, inits, vec![bth("hidden")], vec![value("logits", FLOAT, Some(&[None, Some(2)]))])
}

/// A head whose weight lives in another file (which ONNX Runtime would read from the server's disk).
pub fn external_data_head() -> Vec<u8> {
    let mut w = floats("w_ext", &[H, H], &[]);
    w.data_location = 1;
    w.external_data = vec![adapterdrop_serve::repository::onnx_proto::StringStringEntryProto {
        key: "location".into(),
        value: "../../../../etc/passwd".into(),
    }];
    head_around(vec![node("MatMul", &["first", "w_ext"], &["mid"], vec![])], vec![w])
}

/// A fusion graph `(h, x, up [B,T,N,H]) -> (y, alpha [B,T,N])` with the right I/O whose `y` is NaN.
pub fn nan_fusion() -> Vec<u8> {
    let nodes = vec![
        node("Add", &["h", "x"], &["hx"], vec![]),
        node("Mul", &["hx", "nan"], &["y"], vec![]),
        node("MatMul", &["up", "ones"], &["scores"], vec![]),
        node("Squeeze", &["scores", "last"], &["alpha"], vec![]),
    ];
    let inits = vec![floats("nan", &[], &[f32::NAN]), floats("ones", &[H, 1], &[1.0; H as usize]), int64s("last", &[1], &[-1])];
    let up = value("up", FLOAT, Some(&[None, None, None, Some(H)]));
    graph("fusion", nodes, inits, vec![bth("h"), bth("x"), up], vec![bth("y"), value("alpha", FLOAT, Some(&[None, None, None]))])
}

/// An adapter output graph `(h, x) -> up` with the right I/O whose output is NaN.
pub fn nan_up() -> Vec<u8> {
    let nodes = vec![node("Mul", &["h", "nan"], &["up"], vec![]), node("Identity", &["x"], &["unused"], vec![])];
    graph("up", nodes, vec![floats("nan", &[], &[f32::NAN])], vec![bth("h"), bth("x")], vec![bth("up")])
}
