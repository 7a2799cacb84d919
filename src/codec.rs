//! The protobuf codec of every gRPC service this crate generates (`build.rs` selects it with
//! `codec_path`). tonic-prost reports a message that does not decode as INTERNAL, which blames the
//! server for a client's bytes; this codec encodes as tonic-prost does and reports an undecodable
//! message as [`UndecodableMessage`] (a [`ServeError`] variant), which `src/error.rs` maps to
//! INVALID_ARGUMENT with the decoder's own words (which field, what is wrong).
//!
//! Before decoding, the request types that carry repeated fields (`InferRequest`,
//! `ModelInferRequest`) are pre-scanned on the wire ([`scan`]): a message with more elements along
//! a field path than its hard ceiling ([`ceilings`]) is refused as [`TooManyElements`]
//! (INVALID_ARGUMENT) before prost turns its few bytes into large structs.
//!
//! The generated clients (tests, examples) share the codec, so a response that does not decode is
//! INVALID_ARGUMENT on the client side too; this server never sends one.

pub mod ceilings;
pub mod scan;

use std::any::TypeId;
use std::marker::PhantomData;

use bytes::Buf;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use crate::error::ServeError;

/// A received message that is not valid protobuf for its type: invalid UTF-8 in a string, a
/// wrong wire type, a length past the end of the message, ...
#[derive(Debug, thiserror::Error)]
#[error("undecodable {message} message: {source}")]
pub struct UndecodableMessage {
    /// The message type the bytes were read as (e.g. `InferRequest`).
    pub message: &'static str,
    #[source]
    pub source: prost::DecodeError,
}

/// A request with more elements along a field path than the codec's hard ceiling: refused from
/// its wire bytes, before it is decoded.
#[derive(Debug, thiserror::Error)]
#[error(
    "{message} has more than {ceiling} elements in `{path}`, the server's hard ceiling for one message \
     (checked before decoding; the configured limits are lower): split the request"
)]
pub struct TooManyElements {
    pub message: &'static str,
    pub path: &'static str,
    pub ceiling: usize,
}

/// `T` encoded, `U` decoded, as tonic-prost's `ProstCodec<T, U>`.
#[derive(Debug, Clone)]
pub struct ProtoCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for ProtoCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for ProtoCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProtoDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProtoDecoder { _pd: PhantomData }
    }
}

/// Decodes `U`; an undecodable message is [`UndecodableMessage`] (INVALID_ARGUMENT).
#[derive(Debug, Clone)]
pub struct ProtoDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default + 'static> Decoder for ProtoDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // The message is one contiguous buffer already (tonic reads it whole): taking it as
        // `Bytes` copies nothing.
        let bytes = buf.copy_to_bytes(buf.remaining());
        decode_checked::<U>(bytes).map(Some).map_err(|e| e.into())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The pre-scan schema of a request type, if it has repeated fields worth counting.
fn schema_of<U: 'static>() -> Option<&'static scan::Schema> {
    let t = TypeId::of::<U>();
    if t == TypeId::of::<crate::proto::InferRequest>() {
        Some(&ceilings::INFER_REQUEST)
    } else if t == TypeId::of::<crate::kserve_proto::ModelInferRequest>() {
        Some(&ceilings::MODEL_INFER_REQUEST)
    } else {
        None
    }
}

/// Pre-scan (for the types that have a schema), then decode.
fn decode_checked<U: Message + Default + 'static>(bytes: bytes::Bytes) -> Result<U, ServeError> {
    if let Some(schema) = schema_of::<U>() {
        scan::check(&bytes, schema).map_err(|o| TooManyElements { message: short_type_name::<U>(), path: o.path, ceiling: o.ceiling })?;
    }
    U::decode(bytes).map_err(|source| UndecodableMessage { message: short_type_name::<U>(), source }.into())
}

/// `InferRequest` for `adapterdrop_serve::proto::InferRequest`.
fn short_type_name<U>() -> &'static str {
    let full = std::any::type_name::<U>();
    full.rsplit("::").next().unwrap_or(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{InferRequest, Texts, infer_request::Inputs};

    fn decode(bytes: &[u8]) -> Result<InferRequest, UndecodableMessage> {
        InferRequest::decode(bytes).map_err(|source| UndecodableMessage { message: short_type_name::<InferRequest>(), source })
    }

    #[test]
    fn undecodable_bytes_are_invalid_argument_naming_the_field() {
        let mut good =
            InferRequest { inputs: Some(Inputs::Texts(Texts { texts: vec!["ok".into()] })), ..Default::default() }.encode_to_vec();
        // The text's last byte becomes 0xff: invalid UTF-8 inside InferRequest.texts.texts.
        *good.last_mut().unwrap() = 0xff;
        let status = Status::from(ServeError::from(decode(&good).unwrap_err()));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("undecodable InferRequest message"), "{}", status.message());
        assert!(status.message().contains("UTF-8"), "{}", status.message());
        // Truncated: a length-delimited field that claims more bytes than follow.
        let status = Status::from(ServeError::from(decode(&[0x0a, 0x7f, 0x01]).unwrap_err()));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn too_many_elements_are_invalid_argument_naming_the_field_and_the_ceiling() {
        let sequences = vec![crate::proto::TokenIds::default(); ceilings::MAX_SEQUENCES + 1];
        let msg = InferRequest { inputs: Some(Inputs::Tokens(crate::proto::TokenizedInputs { sequences })), ..Default::default() };
        let status = Status::from(decode_checked::<InferRequest>(msg.encode_to_vec().into()).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("`InferRequest.tokens.sequences`"), "{}", status.message());
        assert!(status.message().contains("more than 4096"), "{}", status.message());
        // Types without a schema are decoded as they are; within the ceilings, so is InferRequest.
        let ok = InferRequest { tasks: vec![Default::default(); ceilings::MAX_TASKS], ..Default::default() };
        assert_eq!(decode_checked::<InferRequest>(ok.encode_to_vec().into()).unwrap().tasks.len(), ceilings::MAX_TASKS);
    }
}
