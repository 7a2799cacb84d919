//! A wire-format pre-scan that counts repeated elements before prost decodes a request.
//!
//! Protobuf decoding turns a few bytes into a large struct: an empty `TokenIds` is 2 bytes on
//! the wire and 72 once decoded, an empty KServe `InferInputTensor` 2 and over 300. Every check
//! of ours runs on the decoded message, so without this scan a message of `server.max_message_bytes`
//! could cost up to 36x its size (more for KServe inputs) before any limit is looked at. The scan
//! walks the bytes once, allocates nothing, and counts the elements of each repeated field along
//! the known field paths of a [`Schema`]; a count above its hard ceiling refuses the message.
//!
//! The scan is at least as lenient as prost: whatever prost would accept is scanned to the end
//! (unknown fields and groups are skipped like prost skips them). Where the bytes are not valid
//! protobuf it stops counting and leaves the verdict to prost, which then reports them
//! undecodable.

/// How the elements of a repeated field are laid out on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    /// Messages, strings, bytes, map entries: one element per length-delimited occurrence.
    Delimited,
    /// Varint scalars (`int64`, `bool`, ...): packed (one per varint) or one per occurrence.
    Varint,
    /// `fixed32`-sized scalars (`float`): packed (4 bytes each) or one per occurrence.
    Fixed32,
    /// `fixed64`-sized scalars (`double`): packed (8 bytes each) or one per occurrence.
    Fixed64,
}

/// A field the scan knows: its elements are counted (when it has a ceiling) and, for a message
/// field, its own fields are scanned in turn.
#[derive(Debug)]
pub struct Field {
    pub number: u32,
    pub elem: Elem,
    /// What an error names, e.g. `InferRequest.tokens.sequences`.
    pub path: &'static str,
    /// Most elements the whole message may hold along this path (all parents together).
    pub ceiling: Option<usize>,
    /// Index of this path's counter (unique within a schema, below [`MAX_COUNTERS`]).
    pub counter: usize,
    /// The fields of a message-typed field worth scanning; empty: the payload is not entered.
    pub nested: &'static [Field],
}

/// The fields of one request type that the scan counts.
#[derive(Debug)]
pub struct Schema {
    pub fields: &'static [Field],
}

/// Counters one scan may use (a fixed array: no allocation per message).
pub const MAX_COUNTERS: usize = 32;

/// A count above its ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverCeiling {
    pub path: &'static str,
    pub ceiling: usize,
}

/// Why a scan stopped early.
enum Stop {
    Over(OverCeiling),
    /// Not protobuf prost accepts: prost's decoder reports it.
    Malformed,
}

impl From<OverCeiling> for Stop {
    fn from(o: OverCeiling) -> Self {
        Stop::Over(o)
    }
}

/// Counts `buf` against `schema`; `Err` names the first path over its ceiling.
pub fn check(buf: &[u8], schema: &Schema) -> Result<(), OverCeiling> {
    let mut counts = [0usize; MAX_COUNTERS];
    match scan(buf, schema.fields, &mut counts) {
        Ok(()) | Err(Stop::Malformed) => Ok(()),
        Err(Stop::Over(o)) => Err(o),
    }
}

fn scan(mut buf: &[u8], fields: &'static [Field], counts: &mut [usize; MAX_COUNTERS]) -> Result<(), Stop> {
    while !buf.is_empty() {
        let (number, wire) = tag(&mut buf)?;
        let Some(field) = fields.iter().find(|f| f.number == number) else {
            skip(&mut buf, wire)?;
            continue;
        };
        let added = match (wire, field.elem) {
            (2, elem) => {
                let payload = delimited(&mut buf)?;
                match elem {
                    Elem::Delimited => {
                        if !field.nested.is_empty() {
                            scan(payload, field.nested, counts)?;
                        }
                        1
                    }
                    // Packed: every varint ends with a byte below 0x80.
                    Elem::Varint => {
                        if payload.last().is_some_and(|b| b & 0x80 != 0) {
                            return Err(Stop::Malformed);
                        }
                        payload.iter().filter(|b| **b & 0x80 == 0).count()
                    }
                    Elem::Fixed32 => payload.len() / 4,
                    Elem::Fixed64 => payload.len() / 8,
                }
            }
            (0, Elem::Varint) => {
                varint(&mut buf)?;
                1
            }
            (5, Elem::Fixed32) => {
                take(&mut buf, 4)?;
                1
            }
            (1, Elem::Fixed64) => {
                take(&mut buf, 8)?;
                1
            }
            // A known field with the wrong wire type: prost refuses the message.
            _ => return Err(Stop::Malformed),
        };
        if let Some(ceiling) = field.ceiling {
            let count = &mut counts[field.counter];
            *count = count.saturating_add(added);
            if *count > ceiling {
                return Err(OverCeiling { path: field.path, ceiling }.into());
            }
        }
    }
    Ok(())
}

/// A field key: (field number, wire type). Prost refuses field number 0 and keys over u32.
fn tag(buf: &mut &[u8]) -> Result<(u32, u8), Stop> {
    let key = varint(buf)?;
    let key = u32::try_from(key).map_err(|_| Stop::Malformed)?;
    let (number, wire) = (key >> 3, (key & 7) as u8);
    if number == 0 {
        return Err(Stop::Malformed);
    }
    Ok((number, wire))
}

/// Skips an unknown field as prost does, groups (nested to any depth) included, without
/// recursion. (Prost also requires an end group to name its start group's field; not checking
/// that only makes the scan more lenient.)
fn skip(buf: &mut &[u8], mut wire: u8) -> Result<(), Stop> {
    let mut open = 0usize;
    loop {
        match wire {
            0 => drop(varint(buf)?),
            1 => drop(take(buf, 8)?),
            2 => drop(delimited(buf)?),
            5 => drop(take(buf, 4)?),
            3 => open += 1,
            4 if open > 0 => open -= 1,
            _ => return Err(Stop::Malformed),
        }
        if open == 0 {
            return Ok(());
        }
        wire = tag(buf)?.1;
    }
}

fn varint(buf: &mut &[u8]) -> Result<u64, Stop> {
    let mut value = 0u64;
    for (i, b) in buf.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if i == 9 && *b > 1 {
                return Err(Stop::Malformed);
            }
            *buf = &buf[i + 1..];
            return Ok(value);
        }
    }
    Err(Stop::Malformed)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], Stop> {
    if buf.len() < n {
        return Err(Stop::Malformed);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], Stop> {
    let len = varint(buf)?;
    let len = usize::try_from(len).map_err(|_| Stop::Malformed)?;
    take(buf, len)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::codec::ceilings::{INFER_REQUEST, MAX_KSERVE_INPUTS, MAX_SEQUENCES, MAX_TASKS, MAX_TOKENS, MODEL_INFER_REQUEST};
    use crate::kserve_proto::model_infer_request::InferInputTensor;
    use crate::kserve_proto::{InferTensorContents, ModelInferRequest};
    use crate::proto::infer_request::Inputs;
    use crate::proto::{InferRequest, TaskRef, TokenIds, TokenizedInputs};

    fn tokens(sequences: Vec<TokenIds>) -> InferRequest {
        InferRequest { inputs: Some(Inputs::Tokens(TokenizedInputs { sequences })), ..Default::default() }
    }

    #[test]
    fn counts_up_to_the_ceiling_and_refuses_one_more() {
        let at = tokens(vec![TokenIds::default(); MAX_SEQUENCES]).encode_to_vec();
        assert_eq!(check(&at, &INFER_REQUEST), Ok(()));
        let over = tokens(vec![TokenIds::default(); MAX_SEQUENCES + 1]).encode_to_vec();
        assert_eq!(check(&over, &INFER_REQUEST), Err(OverCeiling { path: "InferRequest.tokens.sequences", ceiling: MAX_SEQUENCES }));
        let tasks = InferRequest { tasks: vec![TaskRef::default(); MAX_TASKS + 1], ..Default::default() }.encode_to_vec();
        assert_eq!(check(&tasks, &INFER_REQUEST).unwrap_err().path, "InferRequest.tasks");
        // Multiple-choice items: the choices of all items together are sequences.
        let choices = |items: usize, k: usize| {
            let item = crate::proto::ChoiceInput { context: String::new(), choices: vec![String::new(); k] };
            InferRequest { inputs: Some(Inputs::Choices(crate::proto::Choices { items: vec![item; items] })), ..Default::default() }
                .encode_to_vec()
        };
        assert_eq!(check(&choices(MAX_SEQUENCES / 2, 2), &INFER_REQUEST), Ok(()));
        assert_eq!(check(&choices(MAX_SEQUENCES / 4, 5), &INFER_REQUEST).unwrap_err().path, "InferRequest.choices.items.choices");
        assert_eq!(check(&choices(MAX_SEQUENCES + 1, 0), &INFER_REQUEST).unwrap_err().path, "InferRequest.choices.items");
        let k = |n: usize| ModelInferRequest { inputs: vec![InferInputTensor::default(); n], ..Default::default() }.encode_to_vec();
        assert_eq!(check(&k(MAX_KSERVE_INPUTS), &MODEL_INFER_REQUEST), Ok(()));
        assert_eq!(check(&k(MAX_KSERVE_INPUTS + 1), &MODEL_INFER_REQUEST).unwrap_err().path, "ModelInferRequest.inputs");
    }

    #[test]
    fn packed_and_unpacked_scalars_are_counted_across_parents() {
        // Packed (prost's encoding): ids split over two sequences count together.
        let half = TokenIds { input_ids: vec![1; MAX_TOKENS / 2 + 1], ..Default::default() };
        let packed = tokens(vec![half.clone(), half]).encode_to_vec();
        assert_eq!(check(&packed, &INFER_REQUEST).unwrap_err().path, "InferRequest.tokens.sequences.input_ids");
        // Unpacked: one key per element (field 1, varint), which prost accepts too.
        let mut seq = Vec::new();
        for _ in 0..=MAX_TOKENS {
            seq.extend_from_slice(&[0x08, 0x01]);
        }
        let mut tokens_msg = vec![0x0a];
        prost::encoding::encode_varint(seq.len() as u64, &mut tokens_msg);
        tokens_msg.extend_from_slice(&seq);
        let mut msg = vec![0x22];
        prost::encoding::encode_varint(tokens_msg.len() as u64, &mut msg);
        msg.extend_from_slice(&tokens_msg);
        assert_eq!(
            InferRequest::decode(msg.as_slice()).unwrap().inputs.map(|i| match i {
                Inputs::Tokens(t) => t.sequences[0].input_ids.len(),
                _ => 0,
            }),
            Some(MAX_TOKENS + 1)
        );
        assert_eq!(check(&msg, &INFER_REQUEST).unwrap_err().path, "InferRequest.tokens.sequences.input_ids");
        // Typed KServe contents: empty bytes_contents entries.
        let contents = InferTensorContents { bytes_contents: vec![Vec::new(); 2 * MAX_SEQUENCES + 1], ..Default::default() };
        let input = InferInputTensor { contents: Some(contents), ..Default::default() };
        let k = ModelInferRequest { inputs: vec![input], ..Default::default() }.encode_to_vec();
        assert_eq!(check(&k, &MODEL_INFER_REQUEST).unwrap_err().path, "ModelInferRequest.inputs.contents.bytes_contents");
    }

    #[test]
    fn unknown_fields_and_groups_are_skipped_like_prost_skips_them() {
        let mut msg = Vec::new();
        // Unknown field 9: a varint, a fixed64, a fixed32, a delimited blob, and a group holding
        // a nested group, before the counted field.
        msg.extend_from_slice(&[0x48, 0x96, 0x01]);
        msg.extend_from_slice(&[0x49, 1, 2, 3, 4, 5, 6, 7, 8]);
        msg.extend_from_slice(&[0x4d, 1, 2, 3, 4]);
        msg.extend_from_slice(&[0x4a, 0x02, 0xff, 0xff]);
        msg.extend_from_slice(&[0x4b, 0x53, 0x50, 0x05, 0x54, 0x4c]);
        msg.extend(InferRequest { tasks: vec![TaskRef::default(); MAX_TASKS + 1], ..Default::default() }.encode_to_vec());
        InferRequest::decode(msg.as_slice()).expect("prost accepts the unknown fields");
        assert_eq!(check(&msg, &INFER_REQUEST).unwrap_err().path, "InferRequest.tasks");
    }

    #[test]
    fn malformed_bytes_are_left_to_prost() {
        for bad in [&[0x0a, 0x7f, 0x01][..], &[0x00, 0x01], &[0x0c], &[0x22, 0x02, 0x0a], &[0xff; 11]] {
            assert_eq!(check(bad, &INFER_REQUEST), Ok(()), "{bad:?}");
            assert!(InferRequest::decode(bad).is_err(), "{bad:?}");
        }
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// One to three byte edits, deletions or duplicated stretches.
    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut m = seed.to_vec();
        for _ in 0..1 + rng.below(3) {
            let i = rng.below(m.len());
            match rng.below(4) {
                0 => m[i] = rng.next() as u8,
                1 => m[i] ^= 1 << rng.below(8),
                2 => drop(m.remove(i)),
                _ => {
                    let (a, b) = (rng.below(m.len()), rng.below(m.len()));
                    let piece = m[a.min(b)..a.max(b)].to_vec();
                    m.splice(i..i, piece);
                }
            }
        }
        m
    }

    /// Counts of a scan that ran to the end (`None`: it stopped early).
    fn counts(buf: &[u8], schema: &Schema) -> Option<[usize; MAX_COUNTERS]> {
        let mut counts = [0usize; MAX_COUNTERS];
        scan(buf, schema.fields, &mut counts).ok().map(|()| counts)
    }

    /// Whatever prost decodes, the scan reads to the end and counts at least what prost built:
    /// the pre-scan cannot be bypassed by bytes prost accepts.
    #[test]
    fn every_message_prost_accepts_is_scanned_to_the_end_and_counted_in_full() {
        let seeds: Vec<Vec<u8>> = vec![
            InferRequest {
                tasks: vec![TaskRef { name: "a".into(), version: Some(2), drop_first: Some(1), ..Default::default() }; 3],
                inputs: Some(Inputs::Tokens(TokenizedInputs {
                    sequences: vec![
                        TokenIds { input_ids: vec![101, 7, 300, 102], attention_mask: vec![1; 4], token_type_ids: vec![0; 4] };
                        3
                    ],
                })),
                id: "x".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            tokens(vec![TokenIds::default(); 5]).encode_to_vec(),
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut accepted, mut tasks_seen) = (0, 0);
        for round in 0..20_000 {
            let m = mutate(&mut rng, &seeds[round % seeds.len()]);
            let Ok(decoded) = InferRequest::decode(m.as_slice()) else { continue };
            accepted += 1;
            let c = counts(&m, &INFER_REQUEST).unwrap_or_else(|| panic!("prost accepted what the scan gave up on: {m:?}"));
            assert!(c[0] >= decoded.tasks.len(), "{m:?}");
            tasks_seen += decoded.tasks.len();
            if let Some(Inputs::Tokens(t)) = &decoded.inputs {
                assert!(c[3] >= t.sequences.len(), "{m:?}");
                let ids: usize = t.sequences.iter().map(|s| s.input_ids.len()).sum();
                let mask: usize = t.sequences.iter().map(|s| s.attention_mask.len()).sum();
                let types: usize = t.sequences.iter().map(|s| s.token_type_ids.len()).sum();
                assert!(c[4] >= ids && c[5] >= mask && c[6] >= types, "{m:?}");
            }
        }
        assert!(accepted > 1_000 && tasks_seen > 0, "the mutations should leave many decodable messages: {accepted}");
    }

    #[test]
    fn every_kserve_message_prost_accepts_is_scanned_to_the_end_and_counted_in_full() {
        use crate::kserve_proto::InferParameter;
        let text = InferInputTensor {
            name: "TEXT".into(),
            datatype: "BYTES".into(),
            shape: vec![2, 1],
            contents: Some(InferTensorContents { bytes_contents: vec![b"ab".to_vec(), Vec::new()], ..Default::default() }),
            ..Default::default()
        };
        let ids = InferInputTensor {
            name: "input_ids".into(),
            datatype: "INT64".into(),
            shape: vec![1, 3],
            parameters: [("p".to_string(), InferParameter::default())].into(),
            contents: Some(InferTensorContents { int64_contents: vec![101, 7, 102], fp32_contents: vec![1.0], ..Default::default() }),
        };
        let seed = ModelInferRequest {
            model_name: "m".into(),
            parameters: [("tasks".to_string(), InferParameter::default())].into(),
            inputs: vec![text, ids],
            raw_input_contents: vec![vec![1, 2], Vec::new()],
            ..Default::default()
        }
        .encode_to_vec();
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let m = mutate(&mut rng, &seed);
            let Ok(d) = ModelInferRequest::decode(m.as_slice()) else { continue };
            accepted += 1;
            let c = counts(&m, &MODEL_INFER_REQUEST).unwrap_or_else(|| panic!("prost accepted what the scan gave up on: {m:?}"));
            let contents = || d.inputs.iter().filter_map(|i| i.contents.as_ref());
            assert!(c[0] >= d.parameters.len() && c[1] >= d.inputs.len() && c[14] >= d.raw_input_contents.len(), "{m:?}");
            assert!(c[2] >= d.inputs.iter().map(|i| i.shape.len()).sum::<usize>(), "{m:?}");
            assert!(c[3] >= d.inputs.iter().map(|i| i.parameters.len()).sum::<usize>(), "{m:?}");
            assert!(c[8] >= contents().map(|c| c.int64_contents.len()).sum::<usize>(), "{m:?}");
            assert!(c[11] >= contents().map(|c| c.fp32_contents.len()).sum::<usize>(), "{m:?}");
            assert!(c[13] >= contents().map(|c| c.bytes_contents.len()).sum::<usize>(), "{m:?}");
        }
        assert!(accepted > 1_000, "the mutations should leave many decodable messages: {accepted}");
    }
}
