//! The parts of the ONNX protobuf (`onnx/onnx.proto`, IR version 10) that the upload checks read
//! before ONNX Runtime sees a file, and that test helpers write. Field numbers are ONNX's; fields
//! not declared here are skipped when decoding (so never re-encode a decoded model: that drops them).

use bytes::Bytes;
use prost::Message;

#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    /// Model-local functions: custom operators defined inside the file.
    #[prost(message, repeated, tag = "25")]
    pub functions: Vec<FunctionProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    #[prost(string, tag = "1")]
    pub domain: String,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// Only its presence matters: task graphs may not define functions.
#[derive(Clone, PartialEq, Message)]
pub struct FunctionProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "10")]
    pub domain: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    /// Sparse initializers: only counted (refused in task graphs).
    #[prost(message, repeated, tag = "15")]
    pub sparse_initializer: Vec<SparseTensorProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SparseTensorProto {
    #[prost(int64, repeated, tag = "3")]
    pub dims: Vec<i64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "7")]
    pub domain: String,
}

/// `AttributeProto.AttributeType` values used here.
pub mod attribute_type {
    pub const FLOAT: i32 = 1;
    pub const INT: i32 = 2;
    pub const TENSOR: i32 = 4;
    pub const GRAPH: i32 = 5;
    pub const INTS: i32 = 7;
}

#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(message, optional, tag = "6")]
    pub g: Option<GraphProto>,
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
    #[prost(message, repeated, tag = "10")]
    pub tensors: Vec<TensorProto>,
    #[prost(message, repeated, tag = "11")]
    pub graphs: Vec<GraphProto>,
    #[prost(int32, tag = "20")]
    pub r#type: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// A oneof in ONNX; only the tensor case is declared (others decode as absent).
#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    #[prost(message, optional, tag = "1")]
    pub tensor_type: Option<TensorTypeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorTypeProto {
    #[prost(int32, tag = "1")]
    pub elem_type: i32,
    #[prost(message, optional, tag = "2")]
    pub shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<Dimension>,
}

/// A oneof of `dim_value` and `dim_param` in ONNX.
#[derive(Clone, PartialEq, Message)]
pub struct Dimension {
    #[prost(int64, optional, tag = "1")]
    pub dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub dim_param: Option<String>,
}

/// `TensorProto.DataType` values used here.
pub mod data_type {
    pub const FLOAT: i32 = 1;
    pub const BOOL: i32 = 9;
    pub const INT64: i32 = 7;
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    #[prost(bytes = "bytes", repeated, tag = "6")]
    pub string_data: Vec<Bytes>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    #[prost(bytes = "bytes", tag = "9")]
    pub raw_data: Bytes,
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    #[prost(uint64, repeated, tag = "11")]
    pub uint64_data: Vec<u64>,
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    /// 1 = EXTERNAL: the data lives in another file.
    #[prost(int32, tag = "14")]
    pub data_location: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

impl ModelProto {
    /// Decodes without copying tensor data out of `bytes`.
    pub fn parse(bytes: Bytes) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }
}

/// Small builders for tests and tools that write graphs (standard domain, opset 17, IR 10).
pub mod build {
    use super::*;

    pub fn model(graph: GraphProto) -> ModelProto {
        ModelProto {
            ir_version: 10,
            producer_name: "adapterdrop-serve".into(),
            graph: Some(graph),
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
            functions: Vec::new(),
        }
    }

    pub fn node(op: &str, inputs: &[&str], outputs: &[&str], attributes: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: format!("{op}_{}", outputs.first().copied().unwrap_or("")),
            op_type: op.into(),
            attribute: attributes,
            domain: String::new(),
        }
    }

    pub fn int_attr(name: &str, v: i64) -> AttributeProto {
        AttributeProto { name: name.into(), i: Some(v), r#type: attribute_type::INT, ..Default::default() }
    }

    pub fn float_attr(name: &str, v: f32) -> AttributeProto {
        AttributeProto { name: name.into(), f: Some(v), r#type: attribute_type::FLOAT, ..Default::default() }
    }

    pub fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
        AttributeProto { name: name.into(), g: Some(g), r#type: attribute_type::GRAPH, ..Default::default() }
    }

    /// A float32 tensor of `dims` holding `values` (raw little-endian data).
    pub fn floats(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorProto { name: name.into(), dims: dims.to_vec(), data_type: data_type::FLOAT, raw_data: raw.into(), ..Default::default() }
    }

    pub fn int64s(name: &str, dims: &[i64], values: &[i64]) -> TensorProto {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorProto { name: name.into(), dims: dims.to_vec(), data_type: data_type::INT64, raw_data: raw.into(), ..Default::default() }
    }

    /// A tensor-typed graph input or output; `None` dims are symbolic (`d0`, `d1`, ...); `None`
    /// shape leaves the shape undeclared.
    pub fn value(name: &str, elem_type: i32, dims: Option<&[Option<i64>]>) -> ValueInfoProto {
        let shape = dims.map(|dims| TensorShapeProto {
            dim: dims
                .iter()
                .enumerate()
                .map(|(i, d)| match d {
                    Some(v) => Dimension { dim_value: Some(*v), dim_param: None },
                    None => Dimension { dim_value: None, dim_param: Some(format!("d{i}")) },
                })
                .collect(),
        });
        ValueInfoProto { name: name.into(), r#type: Some(TypeProto { tensor_type: Some(TensorTypeProto { elem_type, shape }) }) }
    }

    pub fn encode(model: &ModelProto) -> Vec<u8> {
        model.encode_to_vec()
    }
}
