//! The tract backend: runs any graph of the supported families through
//! tract-onnx, and is the numerical reference for faster backends.
//!
//! Loading declares every input fact itself (batch 1, symbolic new tokens `S`
//! and past `P`, mask `P+S`) and ignores the exporter's intermediate shape
//! annotations, which contradict those symbols in some exports. A serving
//! graph is optimised once; the load-time reference is only typed (see
//! [`Build`]). A sequence keeps its KV cache (or LSTM state) as tensors
//! returned by one call and fed to the next.

use std::sync::Arc;

use tract_linalg::multithread::Executor;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::RunOptions;

use super::{Backend, BatchItem, EngineError, Inner, LoadOptions, Logits, Profile, SeqState};
use crate::model::{self, Family, ModelDir, ModelError};

type Plan = Arc<TypedRunnableModel>;

/// A model optimised by tract, with its I/O positions resolved.
#[derive(Debug)]
pub struct TractBackend {
    family: Family,
    plan: Plan,
    vocab: usize,
    /// Position of each named graph input in the plan's input list.
    inputs: Inputs,
    /// Position of logits and state outputs in the plan's output list.
    logits_out: usize,
    state_out: Vec<usize>,
    /// Spreads a batched step's sequences over threads (serving), when > 1.
    batch_pool: Option<rayon::ThreadPool>,
}

#[derive(Debug)]
enum Inputs {
    Decoder {
        ids: usize,
        mask: Option<usize>,
        pos: Option<usize>,
        past: Vec<usize>,
    },
    Lstm {
        ids: usize,
        h: usize,
        c: usize,
    },
}

/// The sequence state tract needs: the state tensors fed back each call
/// (past keys/values per layer, or h and c).
#[derive(Debug)]
pub struct TractState {
    tensors: Vec<TValue>,
}

fn tract_err<'a>(dir: &'a ModelDir, stage: &'static str) -> impl Fn(TractError) -> ModelError + 'a {
    move |e| ModelError::Tract {
        path: dir.onnx.clone(),
        stage,
        reason: format!("{e:#}"),
    }
}

/// How far [`TractBackend::from_proto`] takes the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build<'a> {
    /// Typed only: runs every op with tract's reference implementations and
    /// holds the weights once (decluttering folds constants into new copies,
    /// optimising packs them again). What the native engine is checked
    /// against at load.
    Reference,
    /// [`Build::Reference`] without the output head: what it returns as
    /// logits are the values of this tensor (the head's input), which
    /// [`Head`] then takes to logits.
    ReferenceUntil(&'a str),
    /// Optimised and planned for speed (packed weight copies): the backend
    /// that serves.
    Optimized,
}

impl TractBackend {
    /// Check, type and (per `build`) optimise the parsed `dir/model.onnx`.
    pub fn from_proto(
        dir: &ModelDir,
        proto: &pb::ModelProto,
        opts: &LoadOptions,
        build: Build<'_>,
    ) -> Result<Self, ModelError> {
        if let Some(ops) = model::unsupported_ops(proto) {
            return Err(ModelError::UnsupportedOp {
                path: dir.onnx.clone(),
                ops,
            });
        }
        let family = model::detect_family(dir, proto)?;
        let vocab = vocab_of(proto, &family);
        let onnx = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true);
        let root = dir.root.to_string_lossy();
        let mut m = onnx
            .parse(proto, Some(&root))
            .map_err(tract_err(dir, "parse the graph"))?
            .model;
        let input_names: Vec<String> = m
            .input_outlets()
            .map_err(tract_err(dir, "list inputs"))?
            .iter()
            .map(|o| m.node(o.node).name.clone())
            .collect();
        let ix = |name: &str| -> Result<usize, ModelError> {
            input_names
                .iter()
                .position(|n| n == name)
                .ok_or_else(|| ModelError::Tract {
                    path: dir.onnx.clone(),
                    stage: "find an input",
                    reason: format!("no graph input named '{name}'"),
                })
        };
        let s = m.symbols.sym("S");
        let p = m.symbols.sym("P");
        let i64_fact = |shape: TVec<TDim>| InferenceFact::dt_shape(i64::datum_type(), shape);
        let f32_fact = |shape: TVec<TDim>| InferenceFact::dt_shape(f32::datum_type(), shape);
        let seq: TVec<TDim> = tvec![1.to_dim(), s.to_dim()];
        let (inputs, mut out_names) = match &family {
            Family::Decoder(io) => {
                m.set_input_fact(ix(&io.input_ids)?, i64_fact(seq.clone()))
                    .map_err(tract_err(dir, "set input facts"))?;
                let mask = io.attention_mask.as_deref().map(ix).transpose()?;
                if let Some(i) = mask {
                    m.set_input_fact(i, i64_fact(tvec![1.to_dim(), p.to_dim() + s.to_dim()]))
                        .map_err(tract_err(dir, "set input facts"))?;
                }
                let pos = io.position_ids.as_deref().map(ix).transpose()?;
                if let Some(i) = pos {
                    m.set_input_fact(i, i64_fact(seq.clone()))
                        .map_err(tract_err(dir, "set input facts"))?;
                }
                let mut past = vec![];
                let kv: TVec<TDim> = tvec![
                    1.to_dim(),
                    io.kv_heads.to_dim(),
                    p.to_dim(),
                    io.head_dim.to_dim()
                ];
                for l in &io.layers {
                    for name in &l[..2] {
                        let i = ix(name)?;
                        m.set_input_fact(i, f32_fact(kv.clone()))
                            .map_err(tract_err(dir, "set input facts"))?;
                        past.push(i);
                    }
                }
                let mut outs = vec![io.logits.clone()];
                outs.extend(io.layers.iter().flat_map(|l| [l[2].clone(), l[3].clone()]));
                (
                    Inputs::Decoder {
                        ids: ix(&io.input_ids)?,
                        mask,
                        pos,
                        past,
                    },
                    outs,
                )
            }
            Family::Lstm(io) => {
                let ids = ix(&io.input_ids)?;
                m.set_input_fact(ids, i64_fact(seq.clone()))
                    .map_err(tract_err(dir, "set input facts"))?;
                let state: TVec<TDim> = tvec![io.layers.to_dim(), 1.to_dim(), io.hidden.to_dim()];
                let (h, c) = (ix(&io.h0)?, ix(&io.c0)?);
                for i in [h, c] {
                    m.set_input_fact(i, f32_fact(state.clone()))
                        .map_err(tract_err(dir, "set input facts"))?;
                }
                (
                    Inputs::Lstm { ids, h, c },
                    vec![io.logits.clone(), io.hn.clone(), io.cn.clone()],
                )
            }
        };
        if let Build::ReferenceUntil(tensor) = build {
            out_names[0] = tensor.to_string();
        }
        // Keep only the outputs Ember reads, in a known order: logits, then state.
        let outlets: Vec<OutletId> = out_names
            .iter()
            .map(|n| find_output(&m, n))
            .collect::<Result<_, _>>()
            .map_err(tract_err(dir, "find the outputs"))?;
        m.select_output_outlets(&outlets)
            .map_err(tract_err(dir, "select the outputs"))?;
        let typed = m
            .into_typed()
            .map_err(tract_err(dir, "infer types and shapes"))?;
        let optimized = match build {
            Build::Reference | Build::ReferenceUntil(_) => typed,
            Build::Optimized => {
                let mut optimized = typed
                    .into_optimized()
                    .map_err(tract_err(dir, "optimise the graph"))?;
                fold_constants(&mut optimized).map_err(tract_err(dir, "fold constants"))?;
                optimized
            }
        };
        let executor = if opts.threads > 1 {
            Executor::multithread(opts.threads)
        } else {
            Executor::SingleThread
        };
        let run_opts = RunOptions {
            executor: Some(executor),
            ..Default::default()
        };
        let plan = optimized
            .into_runnable_with_options(&run_opts)
            .map_err(tract_err(dir, "plan the graph"))?;
        let n_state = out_names.len() - 1;
        // The reference only runs the load-time probe, one sequence: no
        // batch threads to start and stop.
        let batch_pool = if opts.batch_threads > 1 && build == Build::Optimized {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(opts.batch_threads)
                .thread_name(|i| format!("tract-batch-{i}"))
                .build()
                .map_err(|e| ModelError::Tract {
                    path: dir.onnx.clone(),
                    stage: "start the batch threads",
                    reason: e.to_string(),
                })?;
            Some(pool)
        } else {
            None
        };
        Ok(TractBackend {
            batch_pool,
            family,
            plan,
            vocab,
            inputs,
            logits_out: 0,
            state_out: (1..=n_state).collect(),
        })
    }
}

/// The output head as a graph of its own: the nodes from `input` (the last
/// linear layer's input) to the logits, with only the initializers they read.
///
/// The load-time probe runs [`Build::ReferenceUntil`] and then this, each
/// dropped before the next is built: tract's reference implementation of a
/// quantized product converts the weights to i32 and f32 on every call, and
/// for a 49152-word head that is more memory than the rest of the model.
#[derive(Debug)]
pub struct Head {
    proto: pb::ModelProto,
    input: String,
    logits: String,
}

impl Head {
    /// The head of `proto` from `input` to `logits`, when those nodes read
    /// nothing but `input` and constants (so it runs position by position,
    /// with no state).
    pub fn cut(proto: &pb::ModelProto, input: &str, logits: &str) -> Option<Head> {
        use std::collections::{HashMap, HashSet};
        let g = proto.graph.as_ref()?;
        let producer: HashMap<&str, usize> = g
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
            .collect();
        let inits: HashSet<&str> = g.initializer.iter().map(|t| t.name.as_str()).collect();
        let (mut nodes, mut used) = (HashSet::new(), HashSet::new());
        let mut todo = vec![logits];
        while let Some(t) = todo.pop() {
            if t.is_empty() || t == input {
                continue;
            }
            if inits.contains(t) {
                used.insert(t);
            } else if nodes.insert(*producer.get(t)?) {
                todo.extend(g.node[producer[t]].input.iter().map(String::as_str));
            }
        }
        if nodes.is_empty() {
            return None;
        }
        let graph = pb::GraphProto {
            name: format!("{}.head", g.name),
            node: (g.node.iter().enumerate())
                .filter(|(i, _)| nodes.contains(i))
                .map(|(_, n)| n.clone())
                .collect(),
            initializer: (g.initializer.iter())
                .filter(|t| used.contains(t.name.as_str()))
                .cloned()
                .collect(),
            input: vec![pb::ValueInfoProto {
                name: input.to_string(),
                r#type: Some(pb::TypeProto {
                    value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                        elem_type: pb::tensor_proto::DataType::Float as i32,
                        shape: None,
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            output: vec![pb::ValueInfoProto {
                name: logits.to_string(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let proto = pb::ModelProto {
            ir_version: proto.ir_version,
            opset_import: proto.opset_import.clone(),
            functions: proto.functions.clone(),
            graph: Some(graph),
            ..Default::default()
        };
        Some(Head {
            proto,
            input: input.to_string(),
            logits: logits.to_string(),
        })
    }

    /// The tensor the head reads.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Logits of each part of `inputs`: the head's input values of
    /// `rows[i]` positions, as one call each (a dynamically quantized
    /// product takes its scale from the whole call).
    pub fn logits(
        &self,
        dir: &ModelDir,
        inputs: &[Vec<f32>],
        rows: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let err = |stage| tract_err(dir, stage);
        let width = match (inputs.first(), rows.first()) {
            (Some(x), Some(&n)) if n > 0 => x.len() / n,
            _ => return Ok(vec![]),
        };
        let onnx = tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .with_ignore_value_info(true);
        let root = dir.root.to_string_lossy();
        let mut m = onnx
            .parse(&self.proto, Some(&root))
            .map_err(err("parse the head"))?
            .model;
        let s = m.symbols.sym("S");
        let fact = InferenceFact::dt_shape(
            f32::datum_type(),
            tvec![1.to_dim(), s.to_dim(), width.to_dim()],
        );
        m.set_input_fact(0, fact)
            .map_err(err("set the head's input"))?;
        let out = find_output(&m, &self.logits).map_err(err("find the head's output"))?;
        m.select_output_outlets(&[out])
            .map_err(err("select the head's output"))?;
        let plan = (m.into_typed())
            .and_then(|t| t.into_runnable())
            .map_err(err("type the head"))?;
        let run = |x: &[f32], n: usize| -> TractResult<Vec<f32>> {
            let x = Tensor::from_shape(&[1, n, width], x)?;
            let out = plan.run(tvec![x.into_tvalue()])?;
            Ok(out[0]
                .to_plain_array_view::<f32>()?
                .iter()
                .copied()
                .collect())
        };
        (inputs.iter().zip(rows))
            .map(|(x, &n)| run(x, n).map_err(err("run the head")))
            .collect()
    }
}

/// Evaluate once every node whose inputs are all constant, and replace it by
/// its result.
///
/// tract's own constant propagation refuses to materialise anything larger
/// than 4 MiB. For an int8 `MatMulInteger` with a dynamic activation zero
/// point it needs the weight column sums, computed through an i32 copy of the
/// weights (4 bytes a weight): above ~1 M weights that copy exceeds the budget,
/// so the sums were recomputed from the whole matrix on every call. Folding
/// here keeps only the results (the small sums), so the temporary is freed.
fn fold_constants(model: &mut TypedModel) -> TractResult<()> {
    use tract_onnx::tract_core::ops::konst::Const;
    for id in model.eval_order()? {
        let node = model.node(id);
        if node.inputs.is_empty() || node.op_is::<Const>() {
            continue;
        }
        let Some(inputs) = model
            .node_input_facts(id)?
            .iter()
            .map(|f| {
                f.konst
                    .clone()
                    .filter(|k| k.is_plain())
                    .map(|k| k.into_tvalue())
            })
            .collect::<Option<TVec<TValue>>>()
        else {
            continue;
        };
        // `None` for ops with state or that need the run context: left alone.
        let Ok(Some(outputs)) = node.op.eval_out_of_plan(inputs) else {
            continue;
        };
        let name = node.name.clone();
        let mut patch = TypedModelPatch::default();
        for (slot, value) in outputs.into_iter().enumerate() {
            let exotic = model
                .outlet_fact(OutletId::new(id, slot))?
                .exotic_fact
                .clone();
            let konst = Const::new_with_opt_exotic_fact(value.into_arc_tensor(), exotic)?;
            let wire = patch.wire_node(format!("{name}.folded.{slot}"), konst, &[])?[0];
            patch.shunt_outside(model, OutletId::new(id, slot), wire)?;
        }
        patch.apply(model)?;
    }
    model.compact()
}

/// The outlet of a graph output, by its ONNX name.
fn find_output(m: &InferenceModel, name: &str) -> TractResult<OutletId> {
    for o in m.output_outlets()? {
        if m.outlet_label(*o) == Some(name) || (m.node(o.node).name == name && o.slot == 0) {
            return Ok(*o);
        }
    }
    // Outputs are also reachable by their tensor name when they are not graph outputs.
    for node in m.nodes() {
        for slot in 0..node.outputs.len() {
            let o = OutletId::new(node.id, slot);
            if m.outlet_label(o) == Some(name) {
                return Ok(o);
            }
        }
    }
    Err(anyhow::anyhow!("no output named '{name}'"))
}

/// Vocabulary size from the logits output's last dimension.
fn vocab_of(proto: &pb::ModelProto, family: &Family) -> usize {
    let g = proto.graph.as_ref().expect("checked");
    g.output
        .iter()
        .find(|o| o.name == family.logits())
        .and_then(|o| match o.r#type.as_ref()?.value.as_ref()? {
            pb::type_proto::Value::TensorType(t) => {
                match t.shape.as_ref()?.dim.last()?.value.as_ref()? {
                    pb::tensor_shape_proto::dimension::Value::DimValue(v) => Some(*v as usize),
                    _ => None,
                }
            }
        })
        .unwrap_or(0)
}

fn run_err(e: TractError) -> EngineError {
    EngineError::Run(format!("{e:#}"))
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn family(&self) -> &Family {
        &self.family
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn new_state(&self) -> Result<SeqState, EngineError> {
        let tensors = match &self.family {
            Family::Decoder(io) => {
                let empty = Tensor::zero::<f32>(&[1, io.kv_heads, 0, io.head_dim])
                    .map_err(run_err)?
                    .into_tvalue();
                vec![empty; io.layers.len() * 2]
            }
            Family::Lstm(io) => {
                let z = Tensor::zero::<f32>(&[io.layers, 1, io.hidden])
                    .map_err(run_err)?
                    .into_tvalue();
                vec![z.clone(), z]
            }
        };
        Ok(SeqState {
            len: 0,
            inner: Inner::Tract(TractState { tensors }),
        })
    }

    fn forward(
        &self,
        state: &mut SeqState,
        tokens: &[u32],
        which: Logits,
        out: &mut Vec<f32>,
    ) -> Result<(), EngineError> {
        self.forward_impl(state, tokens, which, out, None)
    }

    /// The sequences of a step are independent: with `batch_threads` > 1 they
    /// run in parallel, one per thread at a time (each single-threaded).
    fn forward_batch(&self, items: &mut [BatchItem<'_>]) {
        use rayon::prelude::*;
        let run = |it: &mut BatchItem<'_>| {
            it.result = self.forward(it.state, it.tokens, Logits::Last, it.logits);
        };
        match &self.batch_pool {
            Some(pool) if items.len() > 1 => pool.install(|| items.par_iter_mut().for_each(run)),
            _ => items.iter_mut().for_each(run),
        }
    }

    fn forward_profiled(
        &self,
        state: &mut SeqState,
        tokens: &[u32],
        which: Logits,
        out: &mut Vec<f32>,
        profile: &mut Profile,
    ) -> Result<(), EngineError> {
        self.forward_impl(state, tokens, which, out, Some(profile))
    }
}

impl TractBackend {
    fn forward_impl(
        &self,
        state: &mut SeqState,
        tokens: &[u32],
        which: Logits,
        out: &mut Vec<f32>,
        profile: Option<&mut Profile>,
    ) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if self.vocab > 0 {
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
                return Err(EngineError::BadToken(bad, self.vocab));
            }
        }
        let n = tokens.len();
        let past = state.len;
        let ids = Tensor::from_shape(
            &[1, n],
            &tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(),
        )
        .map_err(run_err)?;
        let n_inputs = self.plan.model().input_outlets().map_err(run_err)?.len();
        let mut inputs: Vec<Option<TValue>> = vec![None; n_inputs];
        let Inner::Tract(inner) = &mut state.inner else {
            return Err(EngineError::Run("sequence state of another backend".into()));
        };
        let mut state_tensors = std::mem::take(&mut inner.tensors).into_iter();
        match &self.inputs {
            Inputs::Decoder {
                ids: i,
                mask,
                pos,
                past: past_ix,
            } => {
                inputs[*i] = Some(ids.into_tvalue());
                if let Some(m) = mask {
                    inputs[*m] = Some(
                        Tensor::from_shape(&[1, past + n], &vec![1i64; past + n])
                            .map_err(run_err)?
                            .into_tvalue(),
                    );
                }
                if let Some(p) = pos {
                    let positions: Vec<i64> = (past as i64..(past + n) as i64).collect();
                    inputs[*p] = Some(
                        Tensor::from_shape(&[1, n], &positions)
                            .map_err(run_err)?
                            .into_tvalue(),
                    );
                }
                for &pi in past_ix {
                    inputs[pi] = state_tensors.next();
                }
            }
            Inputs::Lstm { ids: i, h, c } => {
                inputs[*i] = Some(ids.into_tvalue());
                inputs[*h] = state_tensors.next();
                inputs[*c] = state_tensors.next();
            }
        }
        let inputs: TVec<TValue> = inputs
            .into_iter()
            .map(|t| t.ok_or_else(|| EngineError::Run("an input of the graph was not fed".into())))
            .collect::<Result<_, _>>()?;
        let outputs = match profile {
            None => self.plan.run(inputs).map_err(run_err)?,
            Some(prof) => {
                // Time each node; tract's own evaluator does the work.
                let mut st = self.plan.spawn().map_err(run_err)?;
                st.run_plan_with_eval(inputs, |ctx, op_state, node, inputs| {
                    let t0 = std::time::Instant::now();
                    let r = tract_onnx::tract_core::plan::eval(ctx, op_state, node, inputs);
                    prof.add(node.op.name().as_ref(), t0.elapsed());
                    r
                })
                .map_err(run_err)?
            }
        };
        let logits = outputs[self.logits_out]
            .to_plain_array_view::<f32>()
            .map_err(run_err)?;
        let shape = logits.shape().to_vec();
        if shape.len() != 3 || shape[1] != n {
            return Err(EngineError::Run(format!(
                "logits have shape {shape:?}, expected [1, {n}, vocab]"
            )));
        }
        let flat = logits
            .as_slice()
            .ok_or_else(|| EngineError::Run("logits are not contiguous".into()))?;
        let v = shape[2];
        out.clear();
        match which {
            Logits::Last => out.extend_from_slice(&flat[(n - 1) * v..]),
            Logits::All => out.extend_from_slice(flat),
        }
        let mut outputs: Vec<Option<TValue>> = outputs.into_iter().map(Some).collect();
        inner.tensors = self
            .state_out
            .iter()
            .map(|&i| {
                outputs[i]
                    .take()
                    .ok_or_else(|| EngineError::Run("missing state output".into()))
            })
            .collect::<Result<_, _>>()?;
        state.len += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::native;
    use std::path::Path;

    fn demo(name: &str) -> (ModelDir, pb::ModelProto) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(name);
        let dir = ModelDir::open(&root).unwrap();
        let proto = model::read_proto(&dir).unwrap();
        (dir, proto)
    }

    /// The reference without its head, then the head on its own, give the
    /// whole reference's logits bit for bit, over a prefill and a decode step.
    #[test]
    fn body_then_head_equals_the_whole() {
        for name in ["kjv-gpt2", "kjv-lstm"] {
            let (dir, proto) = demo(name);
            let opts = LoadOptions::default();
            let family = model::detect_family(&dir, &proto).unwrap();
            let input = native::head_input(&dir, &proto).unwrap();
            let head = Head::cut(&proto, &input, family.logits()).unwrap();
            let whole = TractBackend::from_proto(&dir, &proto, &opts, Build::Reference).unwrap();
            let until = Build::ReferenceUntil(head.input());
            let body = TractBackend::from_proto(&dir, &proto, &opts, until).unwrap();
            let (mut sw, mut sb) = (whole.new_state().unwrap(), body.new_state().unwrap());
            let (mut want, mut inputs, mut rows) = (vec![], vec![], vec![]);
            for part in [&[5, 17, 99, 3, 42][..], &[7]] {
                let (mut logits, mut x) = (vec![], vec![]);
                whole
                    .forward(&mut sw, part, Logits::All, &mut logits)
                    .unwrap();
                body.forward(&mut sb, part, Logits::All, &mut x).unwrap();
                let width = x.len() / part.len();
                assert!(
                    width * part.len() == x.len() && width < whole.vocab_size(),
                    "{name}"
                );
                want.push(logits);
                inputs.push(x);
                rows.push(part.len());
            }
            let got = head.logits(&dir, &inputs, &rows).unwrap();
            assert!(
                got == want,
                "{name}: head's logits differ from the whole graph's"
            );
        }
    }

    /// No head unless the logits depend on the cut and constants alone.
    #[test]
    fn a_head_must_read_nothing_but_its_input() {
        let (_, proto) = demo("kjv-gpt2");
        let g = proto.graph.as_ref().unwrap();
        let first_norm = g.node.iter().find(|n| n.op_type == "LayerNormalization");
        // Every layer after the first norm also reads the attention mask.
        assert!(Head::cut(&proto, &first_norm.unwrap().output[0], "logits").is_none());
        assert!(Head::cut(&proto, "no such tensor", "logits").is_none());
        assert!(Head::cut(&proto, "logits", "logits").is_none());
    }
}
