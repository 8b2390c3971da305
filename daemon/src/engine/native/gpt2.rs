//! GPT-2: learned positions, pre-norm blocks with LayerNorm, fused q|k|v
//! projection with bias, GELU MLP.

use ember_kernels::gemv::Parallel;
use ember_kernels::nn::Act;
use ember_kernels::Kernels;

use super::graph::{attr, Graph, Linear, Unrecognized};
use super::kv::{KvArena, KvShape};
use super::ops::{
    add, attend_rows, head_logits, run_linear, store_kv, Embedding, Heads, Norm, Work,
};
use super::{Job, Row};
use crate::model::DecoderIo;

#[derive(Debug)]
struct Block {
    ln1: Norm,
    attn: Linear,
    proj: Linear,
    ln2: Norm,
    fc: Linear,
    out: Linear,
}

/// A GPT-2 read from its ONNX graph.
#[derive(Debug)]
pub struct Gpt2 {
    hidden: usize,
    ff: usize,
    vocab: usize,
    heads: Heads,
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: Norm,
    head: Linear,
    gelu_tanh: bool,
}

impl Gpt2 {
    /// Recognise the GPT-2 structure; any deviation is a reason to stay on tract.
    pub fn recognize(g: &Graph, io: &DecoderIo, quantize_fp32: bool) -> Result<Gpt2, Unrecognized> {
        g.check_ops(&["LayerNormalization", "Split", "Gelu"], "GPT-2")?;
        let pos_ids = io
            .position_ids
            .as_deref()
            .ok_or("no position_ids input (learned positions need it)")?;
        let wte = Embedding::from_gather(g, g.gather_of(&io.input_ids)?)?;
        let wpe = Embedding::from_gather(g, g.gather_of(pos_ids)?)?;
        let lns: Vec<_> = g
            .nodes()
            .iter()
            .filter(|n| n.op_type == "LayerNormalization")
            .collect();
        let gelus: Vec<_> = g.nodes().iter().filter(|n| n.op_type == "Gelu").collect();
        let mut linears = g.linears(quantize_fp32)?;
        let l = io.layers.len();
        if lns.len() != 2 * l + 1 || gelus.len() != l || linears.len() != 4 * l + 1 {
            return Err(format!(
                "expected {} LayerNormalization, {l} Gelu and {} linear layers for {l} layers, found {}, {} and {}",
                2 * l + 1,
                4 * l + 1,
                lns.len(),
                gelus.len(),
                linears.len()
            ));
        }
        let gelu_tanh = match attr::<&[u8]>(gelus[0], "approximate") {
            None | Some(b"none") => false,
            Some(b"tanh") => true,
            Some(other) => {
                return Err(format!(
                    "Gelu approximation {:?}",
                    String::from_utf8_lossy(other)
                ))
            }
        };
        if gelus
            .iter()
            .any(|n| attr::<&[u8]>(n, "approximate") != attr::<&[u8]>(gelus[0], "approximate"))
        {
            return Err("Gelu approximations differ between layers".into());
        }
        let hidden = wte.cols();
        let heads = Heads {
            heads: io.kv_heads,
            kv_heads: io.kv_heads,
            head_dim: io.head_dim,
            scale: 1.0 / (io.head_dim as f32).sqrt(),
        };
        if heads.heads * heads.head_dim != hidden || wpe.cols() != hidden {
            return Err(format!(
                "{} heads of {} do not make the hidden size {hidden}",
                heads.heads, heads.head_dim
            ));
        }
        let head = linears.pop().expect("counted").linear;
        let vocab = wte.rows();
        if head.w.rows() != vocab || head.w.cols() != hidden {
            return Err("the output projection is not hidden → vocabulary".into());
        }
        let mut blocks = vec![];
        let mut lin = linears.into_iter();
        let ff = {
            let mut ff = 0;
            for i in 0..l {
                let (ln1, ln2) = (lns[2 * i], lns[2 * i + 1]);
                let mut next = || lin.next().expect("counted");
                let (attn, proj, fc, out) = (next(), next(), next(), next());
                if attn.input != ln1.output[0] || fc.input != ln2.output[0] {
                    return Err(format!(
                        "layer {i}: projections do not read the layer norms"
                    ));
                }
                ff = fc.linear.w.rows();
                let shapes = [
                    (&attn.linear, 3 * hidden, hidden),
                    (&proj.linear, hidden, hidden),
                    (&fc.linear, ff, hidden),
                    (&out.linear, hidden, ff),
                ];
                if shapes
                    .iter()
                    .any(|(w, r, c)| w.w.rows() != *r || w.w.cols() != *c)
                {
                    return Err(format!("layer {i}: projection shapes are not GPT-2's"));
                }
                blocks.push(Block {
                    ln1: Norm::layer_norm(g, ln1)?,
                    attn: attn.linear,
                    proj: proj.linear,
                    ln2: Norm::layer_norm(g, ln2)?,
                    fc: fc.linear,
                    out: out.linear,
                });
            }
            ff
        };
        Ok(Gpt2 {
            hidden,
            ff,
            vocab,
            heads,
            wte,
            wpe,
            blocks,
            ln_f: Norm::layer_norm(g, lns[2 * l])?,
            head,
            gelu_tanh,
        })
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// Longest sequence the position table allows.
    pub fn max_positions(&self) -> usize {
        self.wpe.rows()
    }

    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.blocks.len(),
            kv_heads: self.heads.kv_heads,
            head_dim: self.heads.head_dim,
        }
    }

    /// Bytes of weights held (packed int8 plus floats).
    pub fn weight_bytes(&self) -> usize {
        let norm = |n: &Norm| 8 * n.gamma.len();
        let norms: usize = self
            .blocks
            .iter()
            .map(|b| norm(&b.ln1) + norm(&b.ln2))
            .sum();
        let lin: usize = self.linears().map(Linear::bytes).sum();
        self.wte.bytes() + self.wpe.bytes() + lin + norm(&self.ln_f) + norms
    }

    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.attn, &b.proj, &b.fc, &b.out])
            .chain([&self.head])
    }

    /// The packed weight bytes a decode step streams, in the order it reads them.
    pub fn packed(&self) -> Vec<&[i8]> {
        self.linears().map(|l| l.w.packed_bytes()).collect()
    }

    /// Whether every projection came from int8 weights in the file.
    pub fn all_int8(&self) -> bool {
        self.linears().all(|l| l.from_int8)
    }

    /// int8 weight bytes a decode step reads (every projection once).
    pub fn streamed_bytes(&self) -> usize {
        self.linears().map(|l| l.w.weight_bytes()).sum()
    }

    pub fn new_work(&self, arena: KvArena, context: usize) -> Work {
        let h = self.hidden;
        Work::new(arena, h, (3 * h).max(self.ff), self.vocab, context, 1)
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
        let (h, n) = (self.hidden, rows.len());
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
            let xr = &mut x[r * h..(r + 1) * h];
            self.wte.read(row.token as usize, xr, false);
            self.wpe.read(row.pos, xr, true);
        }
        for (l, b) in self.blocks.iter().enumerate() {
            b.ln1.apply_layer(k, x, hb);
            let qkv = &mut big[..n * 3 * h];
            run_linear(k, &b.attn, &hb[..n * h], group, qr, qkv, par);
            for (r, row) in rows.iter().enumerate() {
                let (kr, vr) = qkv[r * 3 * h + h..(r + 1) * 3 * h].split_at(h);
                let seq = jobs[row.job].blocks;
                store_kv(k, arena, seq, row.pos, l, self.heads, kr, vr);
            }
            attend_rows(
                k,
                arena,
                rows,
                jobs,
                l,
                self.heads,
                qkv,
                3 * h,
                scores,
                att,
                par,
            );
            run_linear(k, &b.proj, &att[..n * h], group, qr, tmp, par);
            add(x, &tmp[..n * h]);
            b.ln2.apply_layer(k, x, hb);
            let ff = &mut big[..n * self.ff];
            run_linear(k, &b.fc, &hb[..n * h], group, qr, ff, par);
            let act = if self.gelu_tanh {
                Act::GeluTanh
            } else {
                Act::Gelu
            };
            (k.act_f32)(act, ff);
            run_linear(k, &b.out, ff, group, qr, tmp, par);
            add(x, &tmp[..n * h]);
        }
        self.ln_f.apply_layer(k, x, hb);
        head_logits(k, &self.head, &hb[..n * h], rows, jobs, qr, logits, par);
    }
}
