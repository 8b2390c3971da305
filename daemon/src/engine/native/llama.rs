//! The Llama family (Llama, SmolLM, TinyLlama): token embeddings only,
//! RMSNorm, rotary positions (rotate-half), grouped-query attention, SwiGLU
//! MLP, and an output head read as a matrix of its own (tied to the
//! embeddings or not). Projection biases are applied where the graph adds
//! them.

use ember_kernels::gemv::Parallel;
use ember_kernels::nn::{self, Rope, RopeLayout};
use ember_kernels::Kernels;

use super::graph::{Graph, Linear, Unrecognized, Values};
use super::kv::{KvArena, KvShape};
use super::ops::{
    add, attend_rows, head_logits, products, run_linear, store_kv, Embedding, Heads, Work,
};
use super::{Job, Row};
use crate::model::DecoderIo;
use tract_onnx::pb;

/// RMSNorm: `x / sqrt(mean(x²) + eps) · gamma`.
#[derive(Debug)]
struct RmsNorm {
    gamma: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    /// The norm whose `ReduceMean` is `rm`: its consumers are followed
    /// (`Add` eps, `Sqrt`, `Reciprocal` or `Div`, `Mul` by the rows) up to the
    /// `Mul` by a constant of `hidden` values, the scale. Returns the norm and
    /// the tensor it writes.
    fn from_reduce_mean(
        g: &Graph,
        rm: &pb::NodeProto,
        hidden: usize,
    ) -> Result<(RmsNorm, String), Unrecognized> {
        let mut cur = rm.output[0].as_str();
        let mut eps = None;
        for _ in 0..6 {
            let n = g
                .sole_consumer(cur)
                .ok_or_else(|| format!("RMSNorm at '{}' branches", rm.name))?;
            let other = n.input.iter().find(|i| i.as_str() != cur && !i.is_empty());
            match n.op_type.as_str() {
                "Add" => eps = Some(g.scalar(other.ok_or("RMSNorm Add without eps")?)?),
                "Sqrt" | "Reciprocal" | "Div" => {}
                "Mul" => {
                    if let Some(w) = other.filter(|o| g.is_const(o)) {
                        let gamma = g.f32s(w)?;
                        if gamma.len() != hidden {
                            return Err(format!("RMSNorm scale of {} values", gamma.len()));
                        }
                        let eps = eps.ok_or("RMSNorm without eps")?;
                        return Ok((RmsNorm { gamma, eps }, n.output[0].clone()));
                    }
                }
                op => return Err(format!("{op} inside an RMSNorm")),
            }
            cur = &n.output[0];
        }
        Err(format!("RMSNorm at '{}' has no scale", rm.name))
    }

    /// Normalize each row of `x` into `out`.
    fn apply(&self, k: &Kernels, x: &[f32], out: &mut [f32]) {
        out[..x.len()].copy_from_slice(x);
        for row in out[..x.len()].chunks_mut(self.gamma.len()) {
            (k.rms_norm_f32)(row, &self.gamma, self.eps)
        }
    }
}

#[derive(Debug)]
struct Block {
    norm1: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm2: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A Llama-family decoder read from its ONNX graph.
#[derive(Debug)]
pub struct Llama {
    hidden: usize,
    ff: usize,
    vocab: usize,
    max_pos: usize,
    heads: Heads,
    rope: Rope,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    head: Linear,
}

impl Llama {
    /// Recognise the Llama structure; any deviation is a reason to stay on
    /// tract. `context`: the config's context length, which sizes the RoPE
    /// tables (the graph computes angles for any position).
    pub fn recognize(
        g: &Graph,
        io: &DecoderIo,
        context: Option<usize>,
        quantize_fp32: bool,
    ) -> Result<Llama, Unrecognized> {
        g.check_ops(
            &[
                "Pow",
                "ReduceMean",
                "Sqrt",
                "Reciprocal",
                "Neg",
                "Sin",
                "Cos",
                "Sigmoid",
            ],
            "Llama",
        )?;
        let l = io.layers.len();
        let hd = io.head_dim;
        let embed = Embedding::from_gather(g, g.gather_of(&io.input_ids)?)?;
        let hidden = embed.cols();
        if hd == 0 || !hidden.is_multiple_of(hd) || !(hidden / hd).is_multiple_of(io.kv_heads) {
            return Err(format!(
                "hidden size {hidden} is not a whole number of heads of {hd} in groups of {} KV heads",
                io.kv_heads
            ));
        }
        let heads = Heads {
            heads: hidden / hd,
            kv_heads: io.kv_heads,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let rms: Vec<_> = g
            .nodes()
            .iter()
            .filter(|n| n.op_type == "ReduceMean")
            .map(|n| RmsNorm::from_reduce_mean(g, n, hidden))
            .collect::<Result<_, _>>()?;
        let negs = g.nodes().iter().filter(|n| n.op_type == "Neg").count();
        let mut linears = g.linears(quantize_fp32)?;
        if rms.len() != 2 * l + 1 || linears.len() != 7 * l + 1 {
            return Err(format!(
                "expected {} RMSNorms and {} linear layers for {l} layers, found {} and {}",
                2 * l + 1,
                7 * l + 1,
                rms.len(),
                linears.len()
            ));
        }
        if negs != 2 * l {
            return Err(format!(
                "expected rotate-half RoPE on q and k ({} Neg), found {negs} Neg",
                2 * l
            ));
        }
        let base = rope_base(g, hd)?;
        let max_pos = context.ok_or(
            "config.json gives no context length (max_position_embeddings) to size the KV cache",
        )?;
        let head = linears.pop().expect("counted").linear;
        let vocab = head.w.rows();
        if head.w.cols() != hidden || embed.rows() != vocab {
            return Err("the output projection is not hidden → vocabulary".into());
        }
        let (qd, kvd) = (hidden, io.kv_heads * hd);
        let mut rms = rms.into_iter();
        let mut lin = linears.into_iter();
        let mut blocks = vec![];
        let mut ff = 0;
        for i in 0..l {
            let (norm1, n1) = rms.next().expect("counted");
            let (norm2, n2) = rms.next().expect("counted");
            let mut next = || lin.next().expect("counted");
            let (q, k, v, o, mut gate, mut up, down) =
                (next(), next(), next(), next(), next(), next(), next());
            if !g.read_by(&gate.output, "Sigmoid") {
                std::mem::swap(&mut gate, &mut up);
            }
            if !g.read_by(&gate.output, "Sigmoid") || g.read_by(&up.output, "Sigmoid") {
                return Err(format!(
                    "layer {i}: no SwiGLU gate (Sigmoid of one projection)"
                ));
            }
            if [&q, &k, &v].iter().any(|p| p.input != n1) || gate.input != n2 || up.input != n2 {
                return Err(format!("layer {i}: projections do not read the RMSNorms"));
            }
            ff = gate.linear.w.rows();
            let shapes = [
                (&q.linear, qd, hidden),
                (&k.linear, kvd, hidden),
                (&v.linear, kvd, hidden),
                (&o.linear, hidden, qd),
                (&gate.linear, ff, hidden),
                (&up.linear, ff, hidden),
                (&down.linear, hidden, ff),
            ];
            if shapes
                .iter()
                .any(|(w, r, c)| w.w.rows() != *r || w.w.cols() != *c)
            {
                return Err(format!("layer {i}: projection shapes are not Llama's"));
            }
            blocks.push(Block {
                norm1,
                q: q.linear,
                k: k.linear,
                v: v.linear,
                o: o.linear,
                norm2,
                gate: gate.linear,
                up: up.linear,
                down: down.linear,
            });
        }
        let (norm, _) = rms.next().expect("counted");
        Ok(Llama {
            hidden,
            ff,
            vocab,
            max_pos,
            heads,
            rope: Rope::new(hd, max_pos, base, RopeLayout::Half),
            embed,
            blocks,
            norm,
            head,
        })
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Longest sequence (the config's context length).
    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.blocks.len(),
            kv_heads: self.heads.kv_heads,
            head_dim: self.heads.head_dim,
        }
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up, &b.down])
            .chain([&self.head])
    }

    /// Bytes of weights held (packed int8 plus floats).
    pub fn weight_bytes(&self) -> usize {
        let lin: usize = self.linears().map(Linear::bytes).sum();
        let norms = 4 * self.hidden * (2 * self.blocks.len() + 1);
        self.embed.bytes() + lin + norms
    }

    /// Whether every projection came from int8 weights in the file.
    pub fn all_int8(&self) -> bool {
        self.linears().all(|l| l.from_int8)
    }

    /// The packed weight bytes a decode step streams, in the order it reads them.
    pub fn packed(&self) -> Vec<&[i8]> {
        self.linears().map(|l| l.w.packed_bytes()).collect()
    }

    /// int8 weight bytes a decode step reads (every projection once).
    pub fn streamed_bytes(&self) -> usize {
        self.linears().map(|l| l.w.weight_bytes()).sum()
    }

    pub fn new_work(&self, arena: KvArena, context: usize) -> Work {
        let kvd = self.heads.kv_heads * self.heads.head_dim;
        let wide = (self.hidden + 2 * kvd).max(2 * self.ff);
        let group = self.heads.heads / self.heads.kv_heads;
        Work::new(arena, self.hidden, wide, self.vocab, context, group)
    }

    /// Run one chunk of rows (at most [`MAX_ROWS`](super::ops::MAX_ROWS)) through the network,
    /// writing the logits rows ask for into their jobs' outputs.
    pub fn chunk(
        &self,
        k: &Kernels,
        w: &mut Work,
        rows: &[Row],
        jobs: &mut [Job<'_>],
        par: &dyn Parallel,
    ) {
        let (h, n, ff) = (self.hidden, rows.len(), self.ff);
        let hd = self.heads.head_dim;
        let kvd = self.heads.kv_heads * hd;
        let Work {
            arena,
            x,
            h: hb,
            big,
            tmp,
            att,
            scores,
            logits,
            qr,
        } = w;
        let x = &mut x[..n * h];
        let group = |r: usize| rows[r].job;
        for (r, row) in rows.iter().enumerate() {
            self.embed
                .read(row.token as usize, &mut x[r * h..(r + 1) * h], false);
        }
        for (l, b) in self.blocks.iter().enumerate() {
            b.norm1.apply(k, x, hb);
            let (q, rest) = big.split_at_mut(n * h);
            let (kk, rest) = rest.split_at_mut(n * kvd);
            let vv = &mut rest[..n * kvd];
            {
                let xs = qr.quantize(k, &hb[..n * h], h, group);
                products(k, &xs, [(&b.q, q), (&b.k, kk), (&b.v, vv)], par);
            }
            for (r, row) in rows.iter().enumerate() {
                self.rope.apply(&mut q[r * h..(r + 1) * h], row.pos);
                let kr = &mut kk[r * kvd..(r + 1) * kvd];
                self.rope.apply(kr, row.pos);
                let vr = &vv[r * kvd..(r + 1) * kvd];
                let seq = jobs[row.job].blocks;
                store_kv(k, arena, seq, row.pos, l, self.heads, kr, vr);
            }
            attend_rows(k, arena, rows, jobs, l, self.heads, q, h, scores, att, par);
            run_linear(k, &b.o, &att[..n * h], group, qr, tmp, par);
            add(x, &tmp[..n * h]);
            b.norm2.apply(k, x, hb);
            let (gate, rest) = big.split_at_mut(n * ff);
            let up = &mut rest[..n * ff];
            {
                let xs = qr.quantize(k, &hb[..n * h], h, group);
                products(k, &xs, [(&b.gate, gate), (&b.up, up)], par);
            }
            (k.act_f32)(nn::Act::Silu, gate);
            for (g, u) in gate.iter_mut().zip(up.iter()) {
                *g *= u;
            }
            run_linear(k, &b.down, gate, group, qr, tmp, par);
            add(x, &tmp[..n * h]);
        }
        self.norm.apply(k, x, hb);
        head_logits(k, &self.head, &hb[..n * h], rows, jobs, qr, logits, par);
    }
}

/// RoPE's base θ from the graph's inverse frequencies (a constant of
/// `head_dim / 2` values, `θ^(−2i/d)`), checked value by value.
fn rope_base(g: &Graph, hd: usize) -> Result<f32, Unrecognized> {
    if !g.nodes().iter().any(|n| n.op_type == "Cos") {
        return Err("no rotary position embedding (Cos)".into());
    }
    let half = hd / 2;
    for n in g.nodes().iter().filter(|n| n.op_type == "Mul") {
        for i in n.input.iter().filter(|i| g.is_const(i)) {
            let Ok((_, Values::F32(f))) = g.konst(i) else {
                continue;
            };
            if f.len() != half || half < 2 || f[0] != 1.0 {
                continue;
            }
            let base = (f[1] as f64).powf(-(hd as f64) / 2.0);
            let fits = f.iter().enumerate().all(|(i, &v)| {
                let want = base.powf(-2.0 * i as f64 / hd as f64);
                ((v as f64 - want) / want).abs() < 1e-4
            });
            if fits {
                return Ok(base as f32);
            }
        }
    }
    Err(format!(
        "no RoPE inverse frequencies ({half} values θ^(−2i/{hd})) found"
    ))
}
