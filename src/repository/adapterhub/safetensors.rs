//! A reader for the safetensors format (what AdapterHub's `save_adapter` writes): an 8-byte
//! little-endian header length, a JSON header naming each tensor's dtype, shape and byte range, then
//! the raw little-endian data. Every number in the header is checked against the bytes actually
//! present before anything is allocated from it.

use std::collections::BTreeMap;

/// Largest JSON header accepted (the format's own reference implementation uses 100 MB).
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor converted to f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Parses a whole safetensors file; dtypes F32, F64, F16 and BF16 are converted to f32.
pub fn parse(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>, String> {
    let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or("file is shorter than the 8-byte header length")?;
    let header_len = u64::from_le_bytes(len_bytes);
    let available = bytes.len() as u64 - 8;
    if header_len > available || header_len > MAX_HEADER_BYTES {
        return Err(format!("header length {header_len} exceeds the file ({available} bytes after the length) or {MAX_HEADER_BYTES}"));
    }
    let header_end = 8 + header_len as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..header_end]).map_err(|e| format!("header is not a JSON object: {e}"))?;
    let data = &bytes[header_end..];
    let mut out = BTreeMap::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let tensor = read_tensor(&info, data).map_err(|e| format!("tensor `{name}`: {e}"))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

fn read_tensor(info: &serde_json::Value, data: &[u8]) -> Result<Tensor, String> {
    let dtype = info.get("dtype").and_then(|d| d.as_str()).ok_or("no `dtype`")?;
    let width = match dtype {
        "F32" => 4,
        "F64" => 8,
        "F16" | "BF16" => 2,
        other => return Err(format!("dtype {other} is not supported (F32, F64, F16, BF16)")),
    };
    let shape: Vec<usize> = info
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or("no `shape`")?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()).ok_or("shape entries must be non-negative integers"))
        .collect::<Result<_, _>>()?;
    let offsets = info.get("data_offsets").and_then(|o| o.as_array()).ok_or("no `data_offsets`")?;
    let [begin, end] = offsets.as_slice() else { return Err("`data_offsets` must be [begin, end]".into()) };
    let (begin, end) = match (begin.as_u64(), end.as_u64()) {
        (Some(b), Some(e)) if b <= e && e <= data.len() as u64 => (b as usize, e as usize),
        _ => return Err(format!("data_offsets {offsets:?} lie outside the {} data bytes", data.len())),
    };
    let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or("shape overflows")?;
    if count.checked_mul(width) != Some(end - begin) {
        return Err(format!("shape {shape:?} of {dtype} needs {} bytes, data_offsets give {}", count.saturating_mul(width), end - begin));
    }
    let raw = &data[begin..end];
    let values = match dtype {
        "F32" => raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        "F64" => raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or_default()) as f32).collect(),
        "BF16" => raw.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect(),
        _ => raw.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
    };
    Ok(Tensor { shape, data: values })
}

/// IEEE 754 half to single precision (exact: every half is a single).
fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // subnormal: value = m * 2^-24
            let v = m as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Writes a safetensors file of f32 tensors (tests and tools build fixtures with it).
pub fn serialize(tensors: &BTreeMap<String, Tensor>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        let end = offset + t.data.len() * 4;
        header.insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": t.shape, "data_offsets": [offset, end]}));
        offset = end;
    }
    let mut head = serde_json::to_vec(&header).unwrap_or_default();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for t in tensors.values() {
        for v in &t.data {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, shape: Vec<usize>, data: Vec<f32>) -> BTreeMap<String, Tensor> {
        BTreeMap::from([(name.to_string(), Tensor { shape, data })])
    }

    #[test]
    fn round_trip() {
        let t = one("a.weight", vec![2, 3], vec![1.0, -2.5, 3.25, 0.0, f32::MIN_POSITIVE, 7.0]);
        assert_eq!(parse(&serialize(&t)).unwrap(), t);
    }

    #[test]
    fn hostile_headers_are_refused_before_allocating() {
        let mut b = u64::MAX.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        assert!(parse(&b).unwrap_err().contains("header length"));
        assert!(parse(b"\x01\0").unwrap_err().contains("shorter"));
        let header = br#"{"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.extend_from_slice(&[0; 4]);
        assert!(parse(&b).unwrap_err().contains("overflows"));
        let header = br#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.extend_from_slice(&[0; 4]);
        assert!(parse(&b).unwrap_err().contains("outside"));
        let header = br#"{"x":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.extend_from_slice(&[0; 8]);
        assert!(parse(&b).unwrap_err().contains("I64"));
    }

    #[test]
    fn half_precisions_convert_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        let header = br#"{"b":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}"#;
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header);
        b.extend_from_slice(&0x3fc0u16.to_le_bytes());
        assert_eq!(parse(&b).unwrap()["b"].data, vec![1.5]);
    }
}
