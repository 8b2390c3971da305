//! The model directory contract and family detection.
//!
//! A model is a directory holding `model.onnx` and `tokenizer.json`, plus
//! optionally `config.json` and `generation_config.json` (Hugging Face style)
//! and `ember.toml` (Ember's own overrides). The family is read from the
//! graph's inputs and outputs, never from the directory name:
//!
//! * decoder: `input_ids`, `attention_mask`, `position_ids`,
//!   `past_key_values.N.key|value` → `logits`, `present.N.key|value`
//!   (Hugging Face Optimum naming; mask and positions optional);
//! * LSTM: `input_ids`, `h0`, `c0` → `logits`, `hn`, `cn`.
//!
//! Other names can be mapped in `ember.toml`'s `[io]` table.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tract_onnx::pb;

/// Why a model directory could not be loaded. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The path is not a directory.
    #[error("model directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    /// A required file is absent.
    #[error("{what} missing: {path} not found")]
    MissingFile {
        /// Expected location.
        path: PathBuf,
        /// What it should have held.
        what: &'static str,
    },
    /// The file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not an ONNX model: empty, truncated, or another format.
    #[error("{path} is not a valid ONNX model (truncated, corrupt or not ONNX): {reason}")]
    NotOnnx {
        /// The file.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },
    /// The file does not match the checksum shipped beside it.
    #[error("{path} does not match its SHA256SUMS entry (expected {expected}, found {actual}): the file is corrupt or truncated")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// From SHA256SUMS.
        expected: String,
        /// Of the bytes on disk.
        actual: String,
    },
    /// The graph uses operators the tract backend cannot run.
    #[error("{path} uses operators Ember cannot run: {ops}")]
    UnsupportedOp {
        /// The file.
        path: PathBuf,
        /// `Op (domain d, n nodes, e.g. 'name')`, comma separated.
        ops: String,
    },
    /// The graph's inputs/outputs fit no supported family.
    #[error(
        "{path}: inputs [{inputs}] and outputs [{outputs}] match no supported model family. \
         Ember runs decoders (input_ids, attention_mask, position_ids, past_key_values.N.key/value \
         -> logits, present.N.key/value) and LSTMs (input_ids, h0, c0 -> logits, hn, cn); \
         map other names in ember.toml [io]"
    )]
    UnrecognizedIo {
        /// The file.
        path: PathBuf,
        /// Graph input names.
        inputs: String,
        /// Graph output names.
        outputs: String,
    },
    /// config.json, generation_config.json or ember.toml is malformed.
    #[error("bad model configuration {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// tokenizer.json could not be loaded.
    #[error("cannot load tokenizer {path}: {reason}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What the tokenizers crate said.
        reason: String,
    },
    /// The file was replaced or rewritten while it was being loaded (its
    /// weights are read one tensor at a time, after the checksum).
    #[error("{path} changed while it was being loaded; load it again")]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// `--backend native` was asked for a graph the native engine does not run.
    #[error("{path}: the native engine cannot run this model: {reason} (use the tract backend)")]
    NotNative {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// tract refused the graph after it was recognised.
    #[error("{path}: tract could not {stage}: {reason}")]
    Tract {
        /// The file.
        path: PathBuf,
        /// What tract was doing.
        stage: &'static str,
        /// tract's error chain.
        reason: String,
    },
}

/// Names of a decoder's graph inputs and outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderIo {
    /// Token ids input, `[batch, seq]` int64.
    pub input_ids: String,
    /// Optional `[batch, past+seq]` mask of ones.
    pub attention_mask: Option<String>,
    /// Optional `[batch, seq]` absolute positions.
    pub position_ids: Option<String>,
    /// `[batch, seq, vocab]` output.
    pub logits: String,
    /// Per layer: (past key, past value, present key, present value).
    pub layers: Vec<[String; 4]>,
    /// Key/value heads (dim 1 of the cache).
    pub kv_heads: usize,
    /// Head size (dim 3 of the cache).
    pub head_dim: usize,
}

/// Names and sizes of an LSTM language model's I/O.
#[derive(Debug, Clone, PartialEq)]
pub struct LstmIo {
    /// Token ids input, `[batch, seq]` int64.
    pub input_ids: String,
    /// Initial hidden state, `[layers, batch, hidden]`.
    pub h0: String,
    /// Initial cell state.
    pub c0: String,
    /// `[batch, seq, vocab]` output.
    pub logits: String,
    /// Final hidden state.
    pub hn: String,
    /// Final cell state.
    pub cn: String,
    /// Stacked layers (dim 0 of the state).
    pub layers: usize,
    /// Hidden size (dim 2 of the state).
    pub hidden: usize,
}

/// A model family, detected from the graph's I/O.
#[derive(Debug, Clone, PartialEq)]
pub enum Family {
    /// Decoder-only transformer with a KV cache.
    Decoder(DecoderIo),
    /// Recurrent LM with explicit state.
    Lstm(LstmIo),
}

impl Family {
    /// The graph output holding the logits.
    pub fn logits(&self) -> &str {
        match self {
            Family::Decoder(io) => &io.logits,
            Family::Lstm(io) => &io.logits,
        }
    }

    /// "decoder" or "lstm".
    pub fn name(&self) -> &'static str {
        match self {
            Family::Decoder(_) => "decoder",
            Family::Lstm(_) => "lstm",
        }
    }
}

/// `ember.toml`: optional overrides for models that do not follow the conventions.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmberToml {
    /// Context length, when config.json lacks it or is wrong.
    pub context_length: Option<usize>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Option<Vec<u32>>,
    /// I/O names; `{i}` stands for the layer index.
    #[serde(default)]
    pub io: IoNames,
    /// Jinja chat template (overrides `tokenizer_config.json`'s).
    pub chat_template: Option<String>,
}

/// Graph I/O names, defaulting to the conventions in the module docs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IoNames {
    /// Token ids.
    pub input_ids: String,
    /// Attention mask (decoders).
    pub attention_mask: String,
    /// Position ids (decoders).
    pub position_ids: String,
    /// Logits output.
    pub logits: String,
    /// Past key pattern.
    pub past_key: String,
    /// Past value pattern.
    pub past_value: String,
    /// Present key pattern.
    pub present_key: String,
    /// Present value pattern.
    pub present_value: String,
    /// LSTM state inputs and outputs.
    pub h0: String,
    /// See `h0`.
    pub c0: String,
    /// See `h0`.
    pub hn: String,
    /// See `h0`.
    pub cn: String,
}

impl Default for IoNames {
    fn default() -> Self {
        let s = |x: &str| x.to_string();
        IoNames {
            input_ids: s("input_ids"),
            attention_mask: s("attention_mask"),
            position_ids: s("position_ids"),
            logits: s("logits"),
            past_key: s("past_key_values.{i}.key"),
            past_value: s("past_key_values.{i}.value"),
            present_key: s("present.{i}.key"),
            present_value: s("present.{i}.value"),
            h0: s("h0"),
            c0: s("c0"),
            hn: s("hn"),
            cn: s("cn"),
        }
    }
}

/// The parts of a Hugging Face `config.json` Ember reads; all optional.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct HfConfig {
    /// e.g. "gpt2", "llama", "lstm".
    pub model_type: Option<String>,
    /// GPT-2 spelling of the context length.
    pub n_positions: Option<usize>,
    /// GPT-2 alternative.
    pub n_ctx: Option<usize>,
    /// Llama spelling of the context length.
    pub max_position_embeddings: Option<usize>,
    /// Key/value heads, when the graph does not say.
    pub num_key_value_heads: Option<usize>,
    /// Attention heads (GPT-2 spelling `n_head`).
    pub num_attention_heads: Option<usize>,
    /// GPT-2 spelling.
    pub n_head: Option<usize>,
    /// Width.
    pub hidden_size: Option<usize>,
    /// GPT-2 spelling.
    pub n_embd: Option<usize>,
    /// Head size when not width / heads.
    pub head_dim: Option<usize>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<IdOrIds>,
    /// End-of-sequence id(s).
    pub eos_token_id: Option<IdOrIds>,
}

/// `eos_token_id` is a number or a list in Hugging Face configs.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum IdOrIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl IdOrIds {
    fn to_vec(&self) -> Vec<u32> {
        match self {
            IdOrIds::One(x) => vec![*x],
            IdOrIds::Many(v) => v.clone(),
        }
    }
}

/// A model directory, its files checked and its settings read, before any
/// graph work.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory.
    pub root: PathBuf,
    /// `model.onnx`.
    pub onnx: PathBuf,
    /// `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// `config.json`, or defaults.
    pub config: HfConfig,
    /// `ember.toml`, or defaults.
    pub ember: EmberToml,
    /// End-of-sequence ids from generation_config.json / config.json / ember.toml.
    pub eos_ids: Vec<u32>,
}

fn read_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, ModelError> {
    if !path.exists() {
        return Ok(T::default());
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.into(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.into(),
        reason: e.to_string(),
    })
}

impl ModelDir {
    /// Check the directory's files and read its JSON/TOML settings.
    pub fn open(root: &Path) -> Result<Self, ModelError> {
        if !root.is_dir() {
            return Err(ModelError::NotADirectory(root.into()));
        }
        let onnx = root.join("model.onnx");
        if !onnx.is_file() {
            return Err(ModelError::MissingFile {
                path: onnx,
                what: "ONNX graph (model.onnx)",
            });
        }
        let tokenizer = root.join("tokenizer.json");
        if !tokenizer.is_file() {
            return Err(ModelError::MissingFile {
                path: tokenizer,
                what: "tokenizer (tokenizer.json)",
            });
        }
        let config: HfConfig = read_json(&root.join("config.json"))?;
        #[derive(Default, Deserialize)]
        struct GenConfig {
            eos_token_id: Option<IdOrIds>,
        }
        let gen: GenConfig = read_json(&root.join("generation_config.json"))?;
        let ember_path = root.join("ember.toml");
        let ember: EmberToml = if ember_path.exists() {
            let text = std::fs::read_to_string(&ember_path).map_err(|source| ModelError::Io {
                path: ember_path.clone(),
                source,
            })?;
            toml::from_str(&text).map_err(|e| ModelError::Config {
                path: ember_path.clone(),
                reason: e.to_string(),
            })?
        } else {
            EmberToml::default()
        };
        let eos_ids = ember
            .eos_token_ids
            .clone()
            .or_else(|| gen.eos_token_id.as_ref().map(IdOrIds::to_vec))
            .or_else(|| config.eos_token_id.as_ref().map(IdOrIds::to_vec))
            .unwrap_or_default();
        Ok(ModelDir {
            root: root.into(),
            onnx,
            tokenizer,
            config,
            ember,
            eos_ids,
        })
    }

    /// Context length: ember.toml, else config.json; `None` when neither says.
    pub fn context_length(&self) -> Option<usize> {
        let c = &self.config;
        self.ember
            .context_length
            .or(c.max_position_embeddings)
            .or(c.n_positions)
            .or(c.n_ctx)
    }

    /// Verify `model.onnx` against `SHA256SUMS` when the directory ships one.
    pub fn verify_checksum(&self) -> Result<(), ModelError> {
        let sums = self.root.join("SHA256SUMS");
        let Ok(text) = std::fs::read_to_string(&sums) else {
            return Ok(());
        };
        let Some(expected) = text.lines().find_map(|l| {
            let (hash, name) = l.split_once(char::is_whitespace)?;
            (name.trim_start_matches([' ', '*']) == "model.onnx").then(|| hash.to_lowercase())
        }) else {
            return Ok(());
        };
        use sha2::Digest;
        // Hashed as it streams through a small buffer: the file's pages stay
        // in the page cache, not in the daemon's memory.
        let mut hasher = sha2::Sha256::new();
        let io = |source| ModelError::Io {
            path: self.onnx.clone(),
            source,
        };
        let mut file = std::fs::File::open(&self.onnx).map_err(io)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match std::io::Read::read(&mut file, &mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        let actual: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if actual != expected {
            return Err(ModelError::Checksum {
                path: self.onnx.clone(),
                expected,
                actual,
            });
        }
        Ok(())
    }
}

/// What identifies one version of a file: device, inode, size and
/// modification time. Loading compares it before and after, since weights
/// are read from the path tensor by tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVersion(u64, u64, u64, i64, i64);

impl FileVersion {
    /// The version of the file at `path` now.
    pub fn of(path: &Path) -> Result<FileVersion, ModelError> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).map_err(|source| ModelError::Io {
            path: path.into(),
            source,
        })?;
        Ok(FileVersion(
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
        ))
    }
}

/// Decode `model.onnx` into its protobuf, with a clear error. Large
/// initializers stay in the file as external data (the `proto` module):
/// tract and the native engine read each one when they copy it.
pub fn read_proto(dir: &ModelDir) -> Result<pb::ModelProto, ModelError> {
    let not_onnx = |reason: String| ModelError::NotOnnx {
        path: dir.onnx.clone(),
        reason,
    };
    let io = |source| ModelError::Io {
        path: dir.onnx.clone(),
        source,
    };
    let file = std::fs::File::open(&dir.onnx).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Err(not_onnx("the file is empty".into()));
    }
    let location = dir
        .onnx
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.onnx".into());
    let proto = crate::proto::read_model(file, len, &location).map_err(|e| match e {
        crate::proto::Bad::Io(e) => io(e),
        crate::proto::Bad::Format(reason) => not_onnx(reason),
    })?;
    match &proto.graph {
        Some(g) if !g.node.is_empty() && !g.output.is_empty() => Ok(proto),
        _ => Err(not_onnx(
            "it decodes, but holds no graph nodes or outputs".into(),
        )),
    }
}

/// Operators of the graph tract has no implementation for, described for an error message.
pub fn unsupported_ops(proto: &pb::ModelProto) -> Option<String> {
    let known = &tract_onnx::onnx().op_register.0;
    let mut missing: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for n in proto.graph.iter().flat_map(|g| &g.node) {
        if !known.contains_key(&n.op_type) {
            missing
                .entry((n.op_type.clone(), n.domain.clone()))
                .or_default()
                .push(n.name.clone());
        }
    }
    if missing.is_empty() {
        return None;
    }
    let parts: Vec<String> = missing
        .into_iter()
        .map(|((op, domain), names)| {
            let domain = if domain.is_empty() {
                "ai.onnx".to_string()
            } else {
                domain
            };
            format!(
                "{op} (domain {domain}, {} node(s), e.g. '{}')",
                names.len(),
                names[0]
            )
        })
        .collect();
    Some(parts.join(", "))
}

/// Concrete size of dimension `axis` of a graph input, if the file states one.
fn dim(v: &pb::ValueInfoProto, axis: usize) -> Option<usize> {
    let pb::type_proto::Value::TensorType(t) = v.r#type.as_ref()?.value.as_ref()?;
    match t.shape.as_ref()?.dim.get(axis)?.value.as_ref()? {
        pb::tensor_shape_proto::dimension::Value::DimValue(x) if *x > 0 => Some(*x as usize),
        _ => None,
    }
}

/// Recognise the model family from the graph's I/O names.
pub fn detect_family(dir: &ModelDir, proto: &pb::ModelProto) -> Result<Family, ModelError> {
    let graph = proto.graph.as_ref().expect("read_proto checked the graph");
    // Old exporters list initializers among the inputs too.
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !inits.contains(i.name.as_str()))
        .collect();
    let input = |n: &str| inputs.iter().copied().find(|i| i.name == n);
    let has_out = |n: &str| graph.output.iter().any(|o| o.name == n);
    let names = &dir.ember.io;
    let unrecognized = || ModelError::UnrecognizedIo {
        path: dir.onnx.clone(),
        inputs: inputs
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        outputs: graph
            .output
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    };
    if input(&names.input_ids).is_none() || !has_out(&names.logits) {
        return Err(unrecognized());
    }
    let layer = |pat: &str, i: usize| pat.replace("{i}", &i.to_string());
    let mut layers = vec![];
    while let Some(k) = input(&layer(&names.past_key, layers.len())) {
        let i = layers.len();
        let names4 = [
            k.name.clone(),
            layer(&names.past_value, i),
            layer(&names.present_key, i),
            layer(&names.present_value, i),
        ];
        if input(&names4[1]).is_none() || !has_out(&names4[2]) || !has_out(&names4[3]) {
            return Err(unrecognized());
        }
        layers.push(names4);
    }
    if !layers.is_empty() {
        let past0 = input(&layers[0][0]).expect("found above");
        let cfg = &dir.config;
        let heads = cfg.num_attention_heads.or(cfg.n_head);
        let width = cfg.hidden_size.or(cfg.n_embd);
        let kv_heads = dim(past0, 1).or(cfg.num_key_value_heads).or(heads);
        let head_dim = dim(past0, 3)
            .or(cfg.head_dim)
            .or(width.zip(heads).map(|(w, h)| w / h));
        let (Some(kv_heads), Some(head_dim)) = (kv_heads, head_dim) else {
            return Err(ModelError::Config {
                path: dir.root.join("config.json"),
                reason:
                    "the KV cache inputs have no fixed head count/size and config.json does not \
                         give num_key_value_heads and head_dim"
                        .into(),
            });
        };
        let opt = |n: &str| input(n).map(|i| i.name.clone());
        return Ok(Family::Decoder(DecoderIo {
            input_ids: names.input_ids.clone(),
            attention_mask: opt(&names.attention_mask),
            position_ids: opt(&names.position_ids),
            logits: names.logits.clone(),
            layers,
            kv_heads,
            head_dim,
        }));
    }
    if let (Some(h0), Some(_)) = (input(&names.h0), input(&names.c0)) {
        if has_out(&names.hn) && has_out(&names.cn) {
            let (Some(layers), Some(hidden)) = (dim(h0, 0), dim(h0, 2)) else {
                return Err(ModelError::Config {
                    path: dir.onnx.clone(),
                    reason: format!(
                        "LSTM state input '{}' must have fixed [layers, batch, hidden] dims",
                        h0.name
                    ),
                });
            };
            return Ok(Family::Lstm(LstmIo {
                input_ids: names.input_ids.clone(),
                h0: names.h0.clone(),
                c0: names.c0.clone(),
                logits: names.logits.clone(),
                hn: names.hn.clone(),
                cn: names.cn.clone(),
                layers,
                hidden,
            }));
        }
    }
    Err(unrecognized())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file rewritten in place or replaced by a rename is another version.
    #[test]
    fn a_rewritten_or_replaced_file_is_another_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        std::fs::write(&path, b"first").unwrap();
        let v1 = FileVersion::of(&path).unwrap();
        assert_eq!(FileVersion::of(&path).unwrap(), v1);
        std::fs::write(&path, b"second!").unwrap();
        let v2 = FileVersion::of(&path).unwrap();
        assert_ne!(v2, v1);
        let other = dir.path().join("new.onnx");
        std::fs::write(&other, b"second!").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_ne!(FileVersion::of(&path).unwrap(), v2, "new inode");
    }
}
