//! safetensors: `u64 LE header length N`, N bytes of JSON, then the data section.
//!
//! Parsed by hand (rather than `SafeTensors::read_metadata`) so every size is checked without
//! overflow and every message names the tensor; the rules are the reference loader's: header ≤ 100 MB,
//! `end − begin = numel·elsize`, and the tensors tile the data section exactly, without gaps.

use super::{DType, RawTensor};
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeMap;

const MAX_HEADER: usize = 100_000_000;

#[derive(serde::Deserialize)]
struct Info {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

fn dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "I16" => DType::I16,
        "I8" => DType::I8,
        "U8" => DType::U8,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

/// Tensors of one safetensors file, as byte ranges of `buf` (the whole file).
pub(super) fn parse(buf: &[u8]) -> Result<Vec<RawTensor>> {
    let n = buf
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .ok_or_else(|| anyhow!("truncated: no safetensors header length"))?;
    if n > MAX_HEADER as u64 {
        bail!("corrupt safetensors header: claims {n} bytes (limit {MAX_HEADER})");
    }
    let base = 8 + n as usize;
    let header = buf
        .get(8..base)
        .ok_or_else(|| anyhow!("truncated: safetensors header claims {n} bytes, file has {}", buf.len()))?;
    let header = std::str::from_utf8(header).map_err(|e| anyhow!("corrupt safetensors header: not UTF-8: {e}"))?;
    let entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(header).map_err(|e| anyhow!("corrupt safetensors header: {e}"))?;

    let mut out = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let info: Info =
            serde_json::from_value(value).map_err(|e| anyhow!("corrupt safetensors header: tensor {name}: {e}"))?;
        let dtype = dtype(&info.dtype).ok_or_else(|| anyhow!("tensor {name}: unsupported dtype {}", info.dtype))?;
        let (s, e) = info.data_offsets;
        let need = info.shape.iter().try_fold(dtype.size(), |a, &d| a.checked_mul(d));
        if need.is_none() || e.checked_sub(s) != need {
            bail!("tensor {name}: data_offsets [{s}, {e}] do not fit shape {:?} of {dtype}", info.shape);
        }
        out.push(RawTensor { name, dtype, shape: info.shape, start: s, end: e });
    }

    // Tile the data section exactly: catches overlaps, gaps and truncation.
    out.sort_by_key(|t| (t.start, t.end));
    let data_len = buf.len() - base;
    let mut at = 0;
    for t in &out {
        if t.start != at {
            let what = if t.start < at { "overlaps" } else { "leaves a gap before" };
            bail!("tensor {} {what} the previous tensor (data offset {})", t.name, t.start);
        }
        at = t.end;
    }
    if at != data_len {
        let what = if at > data_len { "truncated" } else { "corrupt" };
        bail!("{what}: tensors need {at} data bytes, the file holds {data_len}");
    }
    for t in &mut out {
        t.start += base;
        t.end += base;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{temp_path, Checkpoint, Format};
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;
    use std::collections::HashMap;

    /// f32 `w`, bf16 `b`, u8 `m` serialized by the safetensors crate (header padded to 8).
    fn sample() -> Vec<u8> {
        let w: Vec<u8> = bytemuck::cast_slice(&[1.0f32, -2.0, 3.5, 0.25, 5.0, 6.0]).to_vec();
        let b: Vec<u8> =
            [half::bf16::from_f32(1.5), half::bf16::from_f32(-3.0)].iter().flat_map(|x| x.to_le_bytes()).collect();
        let m = vec![1u8, 2, 3];
        let views = [
            ("w", TensorView::new(Dtype::F32, vec![2, 3], &w).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![2], &b).unwrap()),
            ("m", TensorView::new(Dtype::U8, vec![3], &m).unwrap()),
        ];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    /// Re-pads the JSON header so the data section starts at `8 + N ≡ r (mod 8)`.
    fn repad(bytes: &[u8], r: usize) -> Vec<u8> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end().to_string();
        while (8 + header.len()) % 8 != r {
            header.push(' ');
        }
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&bytes[8 + n..]);
        out
    }

    fn open_bytes(bytes: &[u8]) -> anyhow::Result<Checkpoint> {
        let p = temp_path("t.safetensors");
        std::fs::write(&p, bytes).unwrap();
        let r = Checkpoint::open(&p);
        std::fs::remove_file(&p).unwrap();
        r
    }

    fn err(bytes: &[u8]) -> String {
        format!("{:#}", open_bytes(bytes).err().expect("must fail"))
    }

    fn check(ck: &Checkpoint) {
        assert_eq!(ck.format(), Format::Safetensors);
        assert_eq!(ck.names().collect::<Vec<_>>(), ["b", "m", "w"]);
        let w = ck.require("w").unwrap();
        assert_eq!(w.shape, [2, 3]);
        assert_eq!(w.as_f32().unwrap(), [1.0, -2.0, 3.5, 0.25, 5.0, 6.0]);
        let b = ck.require("b").unwrap().as_bf16().unwrap().to_vec();
        assert_eq!(b, [half::bf16::from_f32(1.5), half::bf16::from_f32(-3.0)]);
        assert_eq!(ck.require("m").unwrap().to_i64_vec().unwrap(), [1, 2, 3]);
        assert_eq!(ck.total_bytes(), 24 + 4 + 3);
    }

    #[test]
    fn reads_aligned_file_zero_copy() {
        let ck = open_bytes(&sample()).unwrap();
        check(&ck);
        assert!(ck.owned.is_empty(), "aligned data must not be copied");
    }

    #[test]
    fn copies_misaligned_tensors() {
        for r in 1..8 {
            let ck = open_bytes(&repad(&sample(), r)).unwrap();
            check(&ck);
            // f32 first at offset 0, so it is copied unless 4 | r; bf16 follows at 24.
            let copies = usize::from(r % 4 != 0) + usize::from(r % 2 != 0);
            assert_eq!(ck.owned.len(), copies, "r = {r}");
        }
    }

    #[test]
    fn refuses_truncated_and_corrupt_files() {
        let good = repad(&sample(), 3);
        for len in 0..good.len() {
            let e = err(&good[..len]);
            assert!(e.contains("t.safetensors"), "{e}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(err(&long).contains("holds"));

        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&good[8..8 + n]).unwrap();
        let with = |from: &str, to: &str| {
            let h = header.replacen(from, to, 1);
            let mut v = (h.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(h.as_bytes());
            v.extend_from_slice(&good[8 + n..]);
            v
        };
        assert!(err(&with("\"BF16\"", "\"F8_E4M3\"")).contains("unsupported dtype F8_E4M3"));
        assert!(err(&with("[24,28]", "[20,24]")).contains("overlaps"));
        assert!(err(&with("[2,3]", "[3,3]")).contains("do not fit shape"));
        assert!(err(&with("[2,3]", "[18446744073709551615,3]")).contains("do not fit shape"));
        assert!(err(&with("\"shape\"", "\"shap\"")).contains("header: tensor"));
        assert!(err(&with("\"w\":", "\"w\"")).contains("corrupt safetensors header"));
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&huge).contains("corrupt safetensors header"));
    }
}
