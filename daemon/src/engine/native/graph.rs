//! Reading an ONNX graph for the native engine: initializers by name, who
//! produces and who consumes each tensor, and the quantized linear layers as
//! exporters really write them.
//!
//! A linear layer `y = x·W (+ b)` appears in four shapes:
//! - onnxruntime `quantize_dynamic`: `DynamicQuantizeLinear(x)` →
//!   `MatMulInteger(xq, Wq, x_zp, W_zp)` → `Cast` → `Mul(·, x_scale·W_scale)` → `Add(b)`;
//! - QOperator: `QuantizeLinear(x)` → `QLinearMatMul(…, Wq, …)` → `DequantizeLinear` → `Add(b)`;
//! - QDQ: `MatMul(x or DQ(Q(x)), DequantizeLinear(Wq))` → `Add(b)`;
//! - fp32: `MatMul(x, W)` → `Add(b)` (or `Gemm`), quantized per row at load.
//!
//! Whatever the shape, the weights end up per-row symmetric int8 in a
//! [`PackedI8`] (`W` transposed: one row per output), which is what the
//! kernels read. Activations are always quantized per token at run time, so
//! a static activation scale in the file (QOperator/QDQ) is not used.

use std::collections::HashMap;
use std::path::Path;

use ember_kernels::gemv::PackedI8;
use tract_onnx::pb;
use tract_onnx::pb_helpers::AttrScalarType;
use tract_onnx::prelude::*;

/// Why a graph is not one the native engine runs (it then stays on tract).
pub type Unrecognized = String;

/// An initializer's values, decoded.
#[derive(Debug)]
pub enum Values {
    F32(Vec<f32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
}

/// A view of the graph with indexes the pattern matchers need.
pub struct Graph<'a> {
    pub g: &'a pb::GraphProto,
    inits: HashMap<&'a str, &'a pb::TensorProto>,
    /// Tensor name → index of the node producing it.
    producer: HashMap<&'a str, usize>,
    /// Tensor name → indexes of the nodes reading it.
    consumers: HashMap<&'a str, Vec<usize>>,
    dir: String,
    /// Fold `Constant` nodes in as initializers.
    constants: HashMap<&'a str, &'a pb::TensorProto>,
}

impl<'a> Graph<'a> {
    pub fn new(proto: &'a pb::ModelProto, dir: &Path) -> Graph<'a> {
        let g = proto.graph.as_ref().expect("read_proto checked the graph");
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut constants = HashMap::new();
        for (i, n) in g.node.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for inp in &n.input {
                consumers.entry(inp.as_str()).or_default().push(i);
            }
            if n.op_type == "Constant" {
                if let (Some(o), Some(t)) = (
                    n.output.first(),
                    n.attribute
                        .iter()
                        .find(|a| a.name == "value")
                        .and_then(|a| a.t.as_ref()),
                ) {
                    constants.insert(o.as_str(), t);
                }
            }
        }
        Graph {
            g,
            inits: g.initializer.iter().map(|t| (t.name.as_str(), t)).collect(),
            producer,
            consumers,
            dir: dir.to_string_lossy().into_owned(),
            constants,
        }
    }

    pub fn nodes(&self) -> &'a [pb::NodeProto] {
        &self.g.node
    }

    /// The node producing `tensor`, if a node does.
    pub fn producer(&self, tensor: &str) -> Option<&'a pb::NodeProto> {
        self.producer.get(tensor).map(|&i| &self.g.node[i])
    }

    /// The node producing `tensor`, if it is an `op`.
    pub fn producer_op(&self, tensor: &str, op: &str) -> Option<&'a pb::NodeProto> {
        self.producer(tensor).filter(|n| n.op_type == op)
    }

    /// The only node reading `tensor`, if it is an `op`.
    pub fn consumer_op(&self, tensor: &str, op: &str) -> Option<&'a pb::NodeProto> {
        self.sole_consumer(tensor).filter(|n| n.op_type == op)
    }

    /// Refuse a graph with an operator outside [`DECODER_OPS`] and `extra`
    /// (a family's own): an unknown operator is computation the native
    /// forward pass would not do.
    pub fn check_ops(&self, extra: &[&str], family: &str) -> Result<(), Unrecognized> {
        match self.nodes().iter().find(|n| {
            !DECODER_OPS.contains(&n.op_type.as_str()) && !extra.contains(&n.op_type.as_str())
        }) {
            Some(n) => Err(format!(
                "operator {} is not part of a {family} graph",
                n.op_type
            )),
            None => Ok(()),
        }
    }

    /// The `Gather` looking up `indices` (an embedding table's lookup).
    pub fn gather_of(&self, indices: &str) -> Result<&'a pb::NodeProto, Unrecognized> {
        self.nodes()
            .iter()
            .find(|n| n.op_type == "Gather" && n.input.get(1).is_some_and(|i| i == indices))
            .ok_or_else(|| format!("no embedding lookup of '{indices}'"))
    }

    /// Whether an `op` node reads `tensor` (among any others).
    pub fn read_by(&self, tensor: &str, op: &str) -> bool {
        self.consumers
            .get(tensor)
            .is_some_and(|v| v.iter().any(|&i| self.g.node[i].op_type == op))
    }

    /// The only node reading `tensor`, if exactly one does.
    pub fn sole_consumer(&self, tensor: &str) -> Option<&'a pb::NodeProto> {
        match self.consumers.get(tensor).map(|v| v.as_slice()) {
            Some([i]) => Some(&self.g.node[*i]),
            _ => None,
        }
    }

    fn tensor_proto(&self, name: &str) -> Option<&'a pb::TensorProto> {
        self.inits
            .get(name)
            .or_else(|| self.constants.get(name))
            .copied()
    }

    /// Whether `name` is a constant (initializer or `Constant` output).
    pub fn is_const(&self, name: &str) -> bool {
        self.tensor_proto(name).is_some()
    }

    /// A constant, read (external data resolved) as a tract tensor.
    fn tensor(&self, name: &str) -> Result<Tensor, Unrecognized> {
        let t = self
            .tensor_proto(name)
            .ok_or_else(|| format!("'{name}' is not a constant"))?;
        let resolver = tract_onnx::data_resolver::default();
        tract_onnx::tensor::load_tensor(&*resolver, t, Some(&self.dir))
            .map_err(|e| format!("cannot read '{name}': {e:#}"))
    }

    /// A constant's shape and values.
    pub fn konst(&self, name: &str) -> Result<(Vec<usize>, Values), Unrecognized> {
        let tensor = self.tensor(name)?;
        let shape = tensor.shape().to_vec();
        let vals = match tensor.datum_type() {
            DatumType::F32 => Values::F32(slice::<f32>(&tensor)?),
            DatumType::I8 => Values::I8(slice::<i8>(&tensor)?),
            DatumType::U8 => Values::U8(slice::<u8>(&tensor)?),
            dt => return Err(format!("'{name}' has unsupported type {dt:?}")),
        };
        Ok((shape, vals))
    }

    /// A constant integer tensor (shapes, slice bounds, axes), as i64s.
    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        let t = self.tensor(name).ok()?;
        let t = t.cast_to::<i64>().ok()?;
        slice::<i64>(&t).ok()
    }

    /// A constant float tensor.
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>, Unrecognized> {
        match self.konst(name)?.1 {
            Values::F32(v) => Ok(v),
            _ => Err(format!("'{name}' is not float")),
        }
    }

    /// A constant scalar float (or 1-element tensor).
    pub fn scalar(&self, name: &str) -> Result<f32, Unrecognized> {
        match self.f32s(name)?.as_slice() {
            [v] => Ok(*v),
            _ => Err(format!("'{name}' is not a scalar")),
        }
    }

    /// A constant zero point is all zeros (absent counts as zero).
    fn zero_point_is_zero(&self, name: Option<&String>) -> Result<bool, Unrecognized> {
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return Ok(true);
        };
        Ok(match self.konst(name)?.1 {
            Values::I8(v) => v.iter().all(|&z| z == 0),
            Values::U8(v) => v.iter().all(|&z| z == 0),
            _ => false,
        })
    }
}

fn slice<T: Datum + Copy>(t: &Tensor) -> Result<Vec<T>, Unrecognized> {
    Ok(t.to_plain_array_view::<T>()
        .map_err(|e| format!("{e:#}"))?
        .iter()
        .copied()
        .collect())
}

/// An attribute of type `T`, through tract's typed reader (a missing or
/// mistyped attribute gives `None`, and the caller's default applies).
pub fn attr<'a, T: AttrScalarType<'a>>(n: &'a pb::NodeProto, name: &str) -> Option<T> {
    n.get_attr_opt(name).ok().flatten()
}

const STATIC_ATTENTION: &str =
    "attention products are quantized (static QDQ/QOperator on q·kᵀ and p·v); \
the native engine computes attention in float and would not match this graph \
(quantize only the weight MatMuls, or use quantize_dynamic)";

/// Operators of every decoder graph the native engine reads: the quantized
/// and float products it packs, and the shape, mask and attention plumbing it
/// replaces with its own cache and attention.
pub const DECODER_OPS: &[&str] = &[
    "Gather",
    "DequantizeLinear",
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "QLinearMatMul",
    "MatMul",
    "Gemm",
    "Cast",
    "Mul",
    "Add",
    "Sub",
    "Div",
    "Reshape",
    "Transpose",
    "Concat",
    "Softmax",
    "Shape",
    "Unsqueeze",
    "Squeeze",
    "Range",
    "LessOrEqual",
    "Less",
    "And",
    "Where",
    "Slice",
    "Constant",
    "ConstantOfShape",
    "Expand",
    "Equal",
    "Not",
    "Identity",
];

/// A linear layer with its weights packed for the kernels.
#[derive(Debug)]
pub struct Linear {
    pub w: PackedI8,
    pub bias: Option<Vec<f32>>,
    /// Whether the file held int8 weights (false: quantized here from fp32).
    pub from_int8: bool,
}

impl Linear {
    /// Bytes held: packed weights with their sums and scales, and the bias.
    pub fn bytes(&self) -> usize {
        self.w.memory_bytes() + 4 * self.bias.as_ref().map_or(0, |b| b.len())
    }
}

/// A matched product, its weights not read yet.
struct Matched<'a> {
    /// The float tensor it reads.
    input: String,
    /// The float tensor it writes, before the bias.
    out: String,
    weights: Weights<'a>,
}

/// Where a matched product's weights are.
enum Weights<'a> {
    /// int8 `[K, N]`, per-tensor or per-column scales, a zero point.
    Int8 {
        w: &'a str,
        scale: &'a str,
        zp: Option<&'a String>,
    },
    /// fp32 `[K, N]`.
    F32 { w: &'a str },
}

/// What a linear layer was recognised from, in graph order.
#[derive(Debug)]
pub struct FoundLinear {
    /// The float tensor the layer reads.
    pub input: String,
    /// The float tensor it writes (after the bias, when it has one).
    pub output: String,
    pub linear: Linear,
}

impl<'a> Graph<'a> {
    /// Every linear layer of the graph, in node order. A product of two
    /// activations (attention's q·kᵀ, p·v) is not a linear layer and is skipped.
    /// `quantize_fp32`: also take fp32 weight matrices (quantized per row here).
    pub fn linears(&self, quantize_fp32: bool) -> Result<Vec<FoundLinear>, Unrecognized> {
        let mut found = vec![];
        for n in &self.g.node {
            let Some(m) = self.matched(n)? else {
                continue;
            };
            let (w, from_int8) = self.pack(n, &m.weights, quantize_fp32)?;
            let (bias, output) = match self.bias_after(&m.out)? {
                Some((b, _)) if b.len() != w.rows() => {
                    return Err(format!("bias of '{}' has {} values", n.name, b.len()));
                }
                Some((b, output)) => (Some(b), output),
                None => (None, m.out),
            };
            found.push(FoundLinear {
                input: m.input,
                output,
                linear: Linear { w, bias, from_int8 },
            });
        }
        Ok(found)
    }

    /// The float tensor the last linear layer reads (the output head's
    /// input, in every family here), found without reading any weights.
    pub fn last_linear_input(&self) -> Option<String> {
        self.g
            .node
            .iter()
            .rev()
            .map(|n| self.matched(n))
            .find(|m| !matches!(m, Ok(None)))?
            .ok()
            .flatten()
            .map(|m| m.input)
    }

    /// `n` as a linear layer, if it is a product of an activation and weights.
    fn matched(&self, n: &'a pb::NodeProto) -> Result<Option<Matched<'a>>, Unrecognized> {
        Ok(match n.op_type.as_str() {
            "MatMulInteger" => Some(self.matmul_integer(n)?),
            "QLinearMatMul" => Some(self.qlinear_matmul(n)?),
            "MatMul" | "Gemm" => self.float_matmul(n)?,
            _ => None,
        })
    }

    /// A matched product's weights, packed, and whether they were int8 in the file.
    fn pack(
        &self,
        n: &pb::NodeProto,
        weights: &Weights<'_>,
        quantize_fp32: bool,
    ) -> Result<(PackedI8, bool), Unrecognized> {
        let (w, scale, zp) = match *weights {
            Weights::Int8 { w, scale, zp } => (w, scale, zp),
            Weights::F32 { w } => return Ok((self.quantize_f32(n, w, quantize_fp32)?, false)),
        };
        let node = &n.name;
        // Packed straight from the tensor as read: no copy of it, nor of its transpose.
        let tensor = self.tensor(w)?;
        if tensor.datum_type() != DatumType::I8 {
            return Err(format!(
                "'{node}': weights are not int8 (u8 weights are not supported natively)"
            ));
        }
        let [k, n] = tensor.shape()[..] else {
            return Err(format!("'{node}': weights are not a matrix"));
        };
        if !self.zero_point_is_zero(zp)? {
            return Err(format!("'{node}': asymmetric weights (zero point ≠ 0)"));
        }
        let scales = self.f32s(scale)?;
        let scales = match scales.len() {
            1 => vec![scales[0]; n],
            l if l == n => scales,
            l => return Err(format!("'{node}': {l} weight scales for {n} columns")),
        };
        let q = (tensor.try_as_plain_ram())
            .and_then(|t| t.as_slice::<i8>())
            .map_err(|e| format!("'{node}': {e:#}"))?;
        Ok((PackedI8::from_quantized_t(q, n, k, &scales), true))
    }

    /// fp32 weights `[K, N]` quantized per output row (opt-in).
    fn quantize_f32(
        &self,
        n: &pb::NodeProto,
        w_name: &str,
        quantize_fp32: bool,
    ) -> Result<PackedI8, Unrecognized> {
        let bad = |why: &str| format!("{} '{}': {why}", n.op_type, n.name);
        if !quantize_fp32 {
            return Err(bad(
                "fp32 weights: the native engine quantizes them only when asked (--quantize-fp32, quantize_fp32 = true)",
            ));
        }
        let (shape, vals) = self.konst(w_name)?;
        let (Values::F32(w), [k, cols]) = (vals, &shape[..]) else {
            return Err(bad("weights are not a float matrix"));
        };
        let (k, cols) = (*k, *cols);
        let mut t = vec![0f32; k * cols];
        for r in 0..k {
            for c in 0..cols {
                t[c * k + r] = w[r * cols + c];
            }
        }
        Ok(PackedI8::quantize(&t, cols, k))
    }

    /// The bias of `Add(out, bias constant)` when `out` flows into one, with
    /// the sum's name.
    fn bias_after(&self, out: &str) -> Result<Option<(Vec<f32>, String)>, Unrecognized> {
        if let Some(add) = self.sole_consumer(out).filter(|n| n.op_type == "Add") {
            let other = if add.input[0] == out {
                &add.input[1]
            } else {
                &add.input[0]
            };
            if self.is_const(other) {
                return Ok(Some((self.f32s(other)?, add.output[0].clone())));
            }
        }
        Ok(None)
    }

    /// The `quantize_dynamic` pattern around a `MatMulInteger`.
    fn matmul_integer(&self, n: &'a pb::NodeProto) -> Result<Matched<'a>, Unrecognized> {
        let bad = |why: &str| format!("MatMulInteger '{}': {why}", n.name);
        let dql = self
            .producer_op(&n.input[0], "DynamicQuantizeLinear")
            .ok_or_else(|| bad("activation not from DynamicQuantizeLinear"))?;
        let cast = self
            .consumer_op(&n.output[0], "Cast")
            .ok_or_else(|| bad("result not cast to float"))?;
        let mul = self
            .consumer_op(&cast.output[0], "Mul")
            .ok_or_else(|| bad("result not scaled"))?;
        // The scale is x_scale · w_scale, one Mul earlier.
        let scale_in = mul
            .input
            .iter()
            .find(|i| **i != cast.output[0])
            .ok_or_else(|| bad("no scale"))?;
        let scale_mul = self
            .producer_op(scale_in, "Mul")
            .ok_or_else(|| bad("scale is not x_scale·w_scale"))?;
        let w_scale = scale_mul
            .input
            .iter()
            .find(|i| self.is_const(i))
            .ok_or_else(|| bad("weight scale is not constant"))?;
        if !scale_mul.input.contains(&dql.output[1]) {
            return Err(bad("scale does not use the activation's scale"));
        }
        if !self.is_const(&n.input[1]) {
            return Err(bad("weights are not constant"));
        }
        Ok(Matched {
            input: dql.input[0].clone(),
            out: mul.output[0].clone(),
            weights: Weights::Int8 {
                w: &n.input[1],
                scale: w_scale,
                zp: n.input.get(3),
            },
        })
    }

    /// QOperator: `QLinearMatMul(a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp)` between
    /// a `QuantizeLinear` and a `DequantizeLinear`.
    fn qlinear_matmul(&self, n: &'a pb::NodeProto) -> Result<Matched<'a>, Unrecognized> {
        let bad = |why: &str| format!("QLinearMatMul '{}': {why}", n.name);
        let q = self
            .producer_op(&n.input[0], "QuantizeLinear")
            .ok_or_else(|| bad("activation not from QuantizeLinear"))?;
        let dq = self
            .consumer_op(&n.output[0], "DequantizeLinear")
            .ok_or_else(|| bad("result not dequantized"))?;
        if !self.is_const(&n.input[3]) {
            return Err(STATIC_ATTENTION.into());
        }
        Ok(Matched {
            input: q.input[0].clone(),
            out: dq.output[0].clone(),
            weights: Weights::Int8 {
                w: &n.input[3],
                scale: &n.input[4],
                zp: n.input.get(5),
            },
        })
    }

    /// `MatMul(x, W)` or `Gemm(x, W)` with W constant fp32, or QDQ
    /// (`W = DequantizeLinear(int8)`); x may be `DequantizeLinear(QuantizeLinear(x))`.
    fn float_matmul(&self, n: &'a pb::NodeProto) -> Result<Option<Matched<'a>>, Unrecognized> {
        let bad = |why: &str| format!("{} '{}': {why}", n.op_type, n.name);
        let mut input = n.input[0].clone();
        if let Some(dq) = self.producer_op(&input, "DequantizeLinear") {
            if let Some(q) = self.producer_op(&dq.input[0], "QuantizeLinear") {
                input = q.input[0].clone();
            }
        }
        let w_name = &n.input[1];
        if n.op_type == "Gemm" {
            let trans_b = attr::<i64>(n, "transB").unwrap_or(0);
            let plain = attr::<i64>(n, "transA").unwrap_or(0) == 0
                && attr::<f32>(n, "alpha").unwrap_or(1.0) == 1.0
                && attr::<f32>(n, "beta").unwrap_or(1.0) == 1.0;
            if !plain || trans_b != 0 || n.input.len() > 2 {
                return Err(bad(
                    "only a plain Gemm (no transposes, bias as Add) is supported",
                ));
            }
        }
        if let Some(dq) = self
            .producer(w_name)
            .filter(|p| p.op_type == "DequantizeLinear" && self.is_const(&p.input[0]))
        {
            if let Some(axis) = attr::<i64>(dq, "axis") {
                if axis != 1 && axis != -1 && self.f32s(&dq.input[1])?.len() > 1 {
                    return Err(bad("weights quantized per input row"));
                }
            }
            return Ok(Some(Matched {
                input,
                out: n.output[0].clone(),
                weights: Weights::Int8 {
                    w: &dq.input[0],
                    scale: &dq.input[1],
                    zp: dq.input.get(2),
                },
            }));
        }
        if !self.is_const(w_name) {
            // Activation × activation (attention): fine in float, but a
            // quantized one is a graph the native engine would not match.
            let dq_of_act = |t: &str| {
                self.producer(t)
                    .is_some_and(|p| p.op_type == "DequantizeLinear" && !self.is_const(&p.input[0]))
            };
            if dq_of_act(&n.input[0]) && dq_of_act(w_name) {
                return Err(STATIC_ATTENTION.into());
            }
            return Ok(None);
        }
        Ok(Some(Matched {
            input,
            out: n.output[0].clone(),
            weights: Weights::F32 { w: w_name },
        }))
    }
}
