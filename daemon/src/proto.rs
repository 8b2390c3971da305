//! Decoding `model.onnx` without holding its weights.
//!
//! Why: a decoded ONNX protobuf owns a copy of every weight. Decoding the
//! whole file, then building tract's model and the native engine's packed
//! weights from it, held the weights three or four times at the load's peak
//! (585 MiB for a model of 157 MiB of weights), which rules out the 512 MB
//! boards Ember is for. Here the protobuf is decoded with each large
//! initializer's `raw_data` left in the file: the tensor is described as
//! ONNX *external data* pointing back at `model.onnx` itself (offset and
//! length), which tract's loader and the native engine already resolve one
//! tensor at a time. Only the graph's structure and small constants are read
//! into memory; big fields are skipped with a seek.
//!
//! The walk is over protobuf's wire format (key, then a varint, a fixed
//! 4 or 8 bytes, or a length and that many bytes) at three levels only:
//! `ModelProto.graph` (field 7), `GraphProto.initializer` (field 5) and
//! `TensorProto.raw_data` (field 9). Every other field is copied as it is
//! and decoded by prost with tract's own message types.

use std::fs::File;
use std::io::{BufReader, ErrorKind, Read};

use prost::encoding::WireType;
use prost::Message;
use tract_onnx::pb;

/// Initializer data of at least this many bytes stays in the file; smaller
/// tensors (scales, zero points, shapes) are decoded inline.
pub const EXTERNAL_MIN: u64 = 4096;

const MODEL_GRAPH: u32 = 7;
const GRAPH_INITIALIZER: u32 = 5;
const TENSOR_RAW_DATA: u32 = 9;

/// Why the file could not be decoded.
#[derive(Debug)]
pub enum Bad {
    /// Reading failed.
    Io(std::io::Error),
    /// The bytes are not a well-formed ONNX protobuf.
    Format(String),
}

impl From<prost::DecodeError> for Bad {
    fn from(e: prost::DecodeError) -> Self {
        Bad::Format(format!("{e:#}"))
    }
}

/// Decode the model in `file` (`len` bytes), its large initializers left in
/// the file as external data at `location` (the file's name, relative to the
/// model directory).
pub fn read_model(file: File, len: u64, location: &str) -> Result<pb::ModelProto, Bad> {
    let mut r = Walker {
        r: BufReader::with_capacity(1 << 16, file),
        pos: 0,
        len,
        location,
    };
    r.model()
}

struct Walker<'a> {
    r: BufReader<File>,
    /// Offset of the next byte in the file.
    pos: u64,
    len: u64,
    location: &'a str,
}

impl Walker<'_> {
    fn model(&mut self) -> Result<pb::ModelProto, Bad> {
        let mut rest = vec![];
        let mut graph = None;
        while self.pos < self.len {
            let start = rest.len();
            let (tag, wire) = self.key(&mut rest)?;
            if tag == MODEL_GRAPH && wire == WireType::LengthDelimited {
                rest.truncate(start);
                let end = self.length(self.len, None)?;
                graph = Some(self.graph(end)?);
            } else {
                self.copy_body(wire, self.len, &mut rest)?;
            }
        }
        let mut model = pb::ModelProto::decode(&rest[..])?;
        if graph.is_some() {
            model.graph = graph;
        }
        Ok(model)
    }

    fn graph(&mut self, end: u64) -> Result<pb::GraphProto, Bad> {
        let mut rest = vec![];
        let mut initializers = vec![];
        while self.pos < end {
            let start = rest.len();
            let (tag, wire) = self.key(&mut rest)?;
            if tag == GRAPH_INITIALIZER && wire == WireType::LengthDelimited {
                rest.truncate(start);
                let t_end = self.length(end, None)?;
                initializers.push(self.tensor(t_end)?);
            } else {
                self.copy_body(wire, end, &mut rest)?;
            }
        }
        self.ends_at(end)?;
        let mut graph = pb::GraphProto::decode(&rest[..])?;
        graph.initializer = initializers;
        Ok(graph)
    }

    fn tensor(&mut self, end: u64) -> Result<pb::TensorProto, Bad> {
        let mut rest = vec![];
        let mut external = None;
        while self.pos < end {
            let start = rest.len();
            let (tag, wire) = self.key(&mut rest)?;
            if tag == TENSOR_RAW_DATA && wire == WireType::LengthDelimited {
                let data_end = self.length(end, Some(&mut rest))?;
                let n = data_end - self.pos;
                if n >= EXTERNAL_MIN {
                    rest.truncate(start);
                    external = Some((self.pos, n));
                    self.skip(n)?;
                } else {
                    // A later `raw_data` replaces an earlier one.
                    external = None;
                    self.bytes(n, &mut rest)?;
                }
            } else {
                self.copy_body(wire, end, &mut rest)?;
            }
        }
        self.ends_at(end)?;
        let mut t = pb::TensorProto::decode(&rest[..])?;
        if let Some((offset, length)) = external {
            let entry = |key: &str, value: String| pb::StringStringEntryProto {
                key: key.into(),
                value,
            };
            t.raw_data.clear();
            t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
            t.external_data = vec![
                entry("location", self.location.into()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
            ];
        }
        Ok(t)
    }

    /// A nested message's last field must end where its length said (a key
    /// or varint read past it means the lengths are corrupt).
    fn ends_at(&self, end: u64) -> Result<(), Bad> {
        if self.pos == end {
            return Ok(());
        }
        Err(Bad::Format(format!(
            "a message meant to end at byte {end} has a field running to byte {}",
            self.pos
        )))
    }

    /// A field key (its bytes appended to `out`).
    fn key(&mut self, out: &mut Vec<u8>) -> Result<(u32, WireType), Bad> {
        let key = self.varint(Some(out))?;
        let tag = u32::try_from(key >> 3)
            .ok()
            .filter(|&t| t > 0)
            .ok_or_else(|| Bad::Format(format!("invalid field key {key} at byte {}", self.pos)))?;
        Ok((tag, WireType::try_from(key & 7)?))
    }

    /// A length prefix (its bytes appended to `out`, if any); returns where
    /// the data ends, checked against the enclosing message's `end`.
    fn length(&mut self, end: u64, out: Option<&mut Vec<u8>>) -> Result<u64, Bad> {
        let n = self.varint(out)?;
        match self.pos.checked_add(n) {
            Some(e) if e <= end => Ok(e),
            _ if end == self.len => Err(Bad::Format(format!(
                "a field of {n} bytes at byte {} runs past the end of the file ({} bytes)",
                self.pos, self.len
            ))),
            _ => Err(Bad::Format(format!(
                "a field of {n} bytes at byte {} overruns its message",
                self.pos
            ))),
        }
    }

    /// The rest of a field after its key, appended to `out`.
    fn copy_body(&mut self, wire: WireType, end: u64, out: &mut Vec<u8>) -> Result<(), Bad> {
        let n = match wire {
            WireType::Varint => return self.varint(Some(out)).map(drop),
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => {
                let data_end = self.length(end, Some(out))?;
                data_end - self.pos
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(Bad::Format(format!(
                    "protobuf group at byte {} (not used by ONNX)",
                    self.pos
                )))
            }
        };
        if self.pos + n > end {
            return Err(Bad::Format(format!(
                "a field at byte {} overruns its message",
                self.pos
            )));
        }
        self.bytes(n, out)
    }

    fn varint(&mut self, mut out: Option<&mut Vec<u8>>) -> Result<u64, Bad> {
        let mut v = 0u64;
        for i in 0..10 {
            let mut b = [0u8];
            self.read(&mut b)?;
            if let Some(o) = out.as_deref_mut() {
                o.push(b[0]);
            }
            v |= u64::from(b[0] & 0x7f) << (7 * i);
            if b[0] < 0x80 {
                return Ok(v);
            }
        }
        Err(Bad::Format(format!(
            "invalid varint before byte {}",
            self.pos
        )))
    }

    fn bytes(&mut self, n: u64, out: &mut Vec<u8>) -> Result<(), Bad> {
        let start = out.len();
        out.resize(start + n as usize, 0);
        self.read(&mut out[start..])
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), Bad> {
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Bad::Format(format!(
                "the file ends inside a field (byte {} of {})",
                self.pos, self.len
            )),
            _ => Bad::Io(e),
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, n: u64) -> Result<(), Bad> {
        let step = i64::try_from(n).map_err(|_| Bad::Format("field too large".into()))?;
        self.r.seek_relative(step).map_err(Bad::Io)?;
        self.pos += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn demo(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{name}"))
    }

    fn read(path: &Path) -> Result<pb::ModelProto, Bad> {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        read_model(file, len, "model.onnx")
    }

    /// The walk gives prost's full decode, with each large `raw_data`
    /// replaced by a reference to the same bytes in the file.
    #[test]
    fn same_model_as_a_full_decode_with_weights_left_in_the_file() {
        for name in ["kjv-gpt2", "kjv-lstm"] {
            let dir = demo(name);
            let bytes = std::fs::read(dir.join("model.onnx")).unwrap();
            let mut full = pb::ModelProto::decode(&bytes[..]).unwrap();
            let default_as_absent = |m: &mut pb::ModelProto| {
                for t in &mut m.graph.as_mut().unwrap().initializer {
                    t.data_location = t.data_location.filter(|&l| l != 0);
                }
            };
            default_as_absent(&mut full);
            let mut walked = read(&dir.join("model.onnx")).unwrap();
            let inits = &mut walked.graph.as_mut().unwrap().initializer;
            let mut external = 0;
            for t in inits.iter_mut() {
                if t.data_location != Some(pb::tensor_proto::DataLocation::External as i32) {
                    continue;
                }
                let resolver = tract_onnx::data_resolver::default();
                let root = dir.to_string_lossy();
                let read = tract_onnx::tensor::load_tensor(&*resolver, t, Some(&root)).unwrap();
                let get = |k: &str| -> usize {
                    let e = t.external_data.iter().find(|e| e.key == k).unwrap();
                    e.value.parse().unwrap()
                };
                let (offset, length) = (get("offset"), get("length"));
                assert!(length as u64 >= EXTERNAL_MIN);
                assert_eq!(read.len() * read.datum_type().size_of(), length);
                t.raw_data = bytes[offset..offset + length].to_vec();
                t.data_location = None;
                t.external_data.clear();
                external += 1;
            }
            assert!(
                external > 4,
                "{name}: only {external} tensors left in the file"
            );
            default_as_absent(&mut walked);
            let (wg, fg) = (walked.graph.as_ref().unwrap(), full.graph.as_ref().unwrap());
            for (w, f) in wg.initializer.iter().zip(&fg.initializer) {
                assert!(w == f, "{name}: initializer {} differs", f.name);
            }
            assert_eq!(wg.initializer.len(), fg.initializer.len());
            assert!(walked == full, "{name}: the models differ");
        }
    }

    /// Cut anywhere or with a byte changed anywhere, the walk returns a
    /// model or a format error; it never panics or reads past the file.
    #[test]
    fn any_cut_or_flipped_byte_is_handled() {
        let src = std::fs::read(demo("kjv-lstm").join("model.onnx")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let step = src.len() / 211;
        for at in (1..src.len()).step_by(step) {
            std::fs::write(&path, &src[..at]).unwrap();
            assert!(!matches!(read(&path), Err(Bad::Io(_))), "cut at {at}");
            let mut flipped = src.clone();
            flipped[at] ^= 0xa5;
            std::fs::write(&path, &flipped).unwrap();
            assert!(!matches!(read(&path), Err(Bad::Io(_))), "flip at {at}");
        }
    }

    /// A tensor of 2 bytes whose last field, a varint, takes 3: the walk
    /// stops there rather than read on out of step with the file.
    #[test]
    fn a_field_across_its_message_end_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        // graph (7) { initializer (5) [len 2] { data_type (2): 0x81 0x01 } }
        std::fs::write(&path, [0x3a, 0x05, 0x2a, 0x02, 0x10, 0x81, 0x01]).unwrap();
        match read(&path) {
            Err(Bad::Format(reason)) => {
                assert!(reason.contains("meant to end at byte 6"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Protobuf keeps the last of a repeated scalar field: a small
    /// `raw_data` after a large one is the tensor's data, inline.
    #[test]
    fn the_last_raw_data_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        // A length-delimited field: key, length, bytes.
        let field = |key: u8, body: &[u8]| {
            let mut f = vec![key];
            prost::encoding::encode_varint(body.len() as u64, &mut f);
            f.extend_from_slice(body);
            f
        };
        let mut tensor = field(0x4a, &[7u8; EXTERNAL_MIN as usize]); // raw_data (9)
        tensor.extend(field(0x4a, &[1, 2, 3]));
        let model = field(0x3a, &field(0x2a, &tensor)); // graph (7) { initializer (5) }
        std::fs::write(&path, &model).unwrap();
        let m = read(&path).unwrap();
        let t = &m.graph.unwrap().initializer[0];
        assert_eq!(t.raw_data, [1, 2, 3]);
        assert!(t.external_data.is_empty() && t.data_location.is_none());
    }

    #[test]
    fn truncated_and_corrupt_files_are_format_errors() {
        let src = std::fs::read(demo("kjv-gpt2").join("model.onnx")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        let mut overrun = src.clone();
        // The first field's length prefix made huge.
        overrun[1] = 0xff;
        overrun[2] = 0xff;
        overrun[3] = 0x7f;
        for (what, bytes) in [
            ("half", &src[..src.len() / 2]),
            ("a few bytes", &src[..3]),
            ("text", &b"not a model at all, just some text\n"[..]),
            ("length past the end", &overrun[..]),
        ] {
            std::fs::write(&path, bytes).unwrap();
            match read(&path) {
                Err(Bad::Format(reason)) => assert!(!reason.is_empty(), "{what}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }
}
