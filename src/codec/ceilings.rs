//! Hard ceilings on the repeated elements of a request message, enforced by the codec's
//! pre-scan before prost decodes it (see [`super::scan`]). The codec has no settings, so these
//! are fixed; the `limits.*` settings that count the same things may not exceed them
//! (`config::Settings::validate`), so a request within the configured limits always passes.
//!
//! What a ceiling bounds is the decoded size of elements that are nearly free on the wire:
//! at most 4096 empty `TokenIds` (72 bytes each once decoded) instead of one per 2 bytes sent.

use super::scan::{Elem, Field, Schema};

/// Sequences (texts, pairs or token sequences) in one request: ceiling of
/// `limits.max_sequences_per_request` (default 256).
pub const MAX_SEQUENCES: usize = 4096;
/// Task references in one native request: ceiling of `limits.max_tasks_per_request` (default 32).
pub const MAX_TASKS: usize = 1024;
/// Token ids (and, separately, mask and type entries) in one request, before `truncate`:
/// ceiling of `limits.max_tokens_per_request` (default 65,536).
pub const MAX_TOKENS: usize = 1 << 20;
/// KServe inputs, raw input buffers and request parameters (the server reads 5 inputs and 4
/// parameters; Triton's reserved ones fit too).
pub const MAX_KSERVE_INPUTS: usize = 64;
pub const MAX_KSERVE_PARAMETERS: usize = 64;
/// KServe requested outputs: a fan-out names up to 4 outputs per task, so this is the API's own
/// bound (`api::kserve::decode`) rather than 64.
pub const MAX_KSERVE_OUTPUTS: usize = 1024;
/// Dimensions of all KServe input shapes together (16 per input on average; the server reads 2).
pub const MAX_KSERVE_SHAPE_DIMS: usize = 1024;
/// Parameters of all inputs together, and of all outputs together (Triton clients set one or two
/// per output, e.g. `binary_data`).
pub const MAX_KSERVE_INPUT_PARAMETERS: usize = 256;
pub const MAX_KSERVE_OUTPUT_PARAMETERS: usize = 4 * MAX_KSERVE_OUTPUTS;
/// Typed `bytes_contents` of all inputs together: `TEXT` and `TEXT_PAIR`.
pub const MAX_KSERVE_BYTES_ELEMENTS: usize = 2 * MAX_SEQUENCES;
/// Elements of each typed numeric `*_contents` field over all inputs: `input_ids`,
/// `attention_mask` and `token_type_ids` (padded, before `truncate`).
pub const MAX_KSERVE_NUMERIC_ELEMENTS: usize = 3 * MAX_TOKENS;

const fn counted(number: u32, elem: Elem, path: &'static str, ceiling: usize, counter: usize, nested: &'static [Field]) -> Field {
    Field { number, elem, path, ceiling: Some(ceiling), counter, nested }
}

/// A singular message field: not counted (prost merges repeats of it into one), only entered.
const fn entered(number: u32, path: &'static str, nested: &'static [Field]) -> Field {
    Field { number, elem: Elem::Delimited, path, ceiling: None, counter: 0, nested }
}

/// `adapterdrop.v1.InferRequest` (`proto/adapterdrop/v1/adapterdrop.proto`).
pub static INFER_REQUEST: Schema = Schema {
    fields: &[
        counted(1, Elem::Delimited, "InferRequest.tasks", MAX_TASKS, 0, &[]),
        entered(2, "InferRequest.texts", &[counted(1, Elem::Delimited, "InferRequest.texts.texts", MAX_SEQUENCES, 1, &[])]),
        entered(3, "InferRequest.pairs", &[counted(1, Elem::Delimited, "InferRequest.pairs.pairs", MAX_SEQUENCES, 2, &[])]),
        entered(
            4,
            "InferRequest.tokens",
            &[counted(
                1,
                Elem::Delimited,
                "InferRequest.tokens.sequences",
                MAX_SEQUENCES,
                3,
                &[
                    counted(1, Elem::Varint, "InferRequest.tokens.sequences.input_ids", MAX_TOKENS, 4, &[]),
                    counted(2, Elem::Varint, "InferRequest.tokens.sequences.attention_mask", MAX_TOKENS, 5, &[]),
                    counted(3, Elem::Varint, "InferRequest.tokens.sequences.token_type_ids", MAX_TOKENS, 6, &[]),
                ],
            )],
        ),
        entered(
            20,
            "InferRequest.choices",
            &[counted(
                1,
                Elem::Delimited,
                "InferRequest.choices.items",
                MAX_SEQUENCES,
                7,
                &[counted(2, Elem::Delimited, "InferRequest.choices.items.choices", MAX_SEQUENCES, 8, &[])],
            )],
        ),
    ],
};

const NUMERIC: usize = MAX_KSERVE_NUMERIC_ELEMENTS;

/// `inference.InferTensorContents` inside a request input.
static CONTENTS: [Field; 8] = [
    counted(1, Elem::Varint, "ModelInferRequest.inputs.contents.bool_contents", NUMERIC, 6, &[]),
    counted(2, Elem::Varint, "ModelInferRequest.inputs.contents.int_contents", NUMERIC, 7, &[]),
    counted(3, Elem::Varint, "ModelInferRequest.inputs.contents.int64_contents", NUMERIC, 8, &[]),
    counted(4, Elem::Varint, "ModelInferRequest.inputs.contents.uint_contents", NUMERIC, 9, &[]),
    counted(5, Elem::Varint, "ModelInferRequest.inputs.contents.uint64_contents", NUMERIC, 10, &[]),
    counted(6, Elem::Fixed32, "ModelInferRequest.inputs.contents.fp32_contents", NUMERIC, 11, &[]),
    counted(7, Elem::Fixed64, "ModelInferRequest.inputs.contents.fp64_contents", NUMERIC, 12, &[]),
    counted(8, Elem::Delimited, "ModelInferRequest.inputs.contents.bytes_contents", MAX_KSERVE_BYTES_ELEMENTS, 13, &[]),
];

/// `inference.ModelInferRequest` (`proto/kserve/grpc_service.proto`).
pub static MODEL_INFER_REQUEST: Schema = Schema {
    fields: &[
        counted(4, Elem::Delimited, "ModelInferRequest.parameters", MAX_KSERVE_PARAMETERS, 0, &[]),
        counted(
            5,
            Elem::Delimited,
            "ModelInferRequest.inputs",
            MAX_KSERVE_INPUTS,
            1,
            &[
                counted(3, Elem::Varint, "ModelInferRequest.inputs.shape", MAX_KSERVE_SHAPE_DIMS, 2, &[]),
                counted(4, Elem::Delimited, "ModelInferRequest.inputs.parameters", MAX_KSERVE_INPUT_PARAMETERS, 3, &[]),
                entered(5, "ModelInferRequest.inputs.contents", &CONTENTS),
            ],
        ),
        counted(
            6,
            Elem::Delimited,
            "ModelInferRequest.outputs",
            MAX_KSERVE_OUTPUTS,
            4,
            &[counted(2, Elem::Delimited, "ModelInferRequest.outputs.parameters", MAX_KSERVE_OUTPUT_PARAMETERS, 5, &[])],
        ),
        counted(7, Elem::Delimited, "ModelInferRequest.raw_input_contents", MAX_KSERVE_INPUTS, 14, &[]),
    ],
};
