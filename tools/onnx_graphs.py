"""Hand-built ONNX graphs for Ember's model families.

The graphs are written with `onnx.helper` rather than `torch.onnx.export` so
that the I/O contract is exactly the one Ember documents (Hugging Face Optimum
decoder naming, the LSTM state convention) whatever the torch version, and so
that GELU is a single `Gelu` op (opset 20) instead of a chain of small ops.

Every builder takes plain numpy weights, so the same code exports trained demo
models and random-weight test fixtures.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20


class G:
    """A tiny graph builder: unique names, initializers, nodes."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def const(self, arr: np.ndarray, hint: str = "c") -> str:
        nm = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), nm))
        return nm

    def i64(self, vals, hint: str = "shape") -> str:
        return self.const(np.asarray(vals, dtype=np.int64), hint)

    def f32(self, val, hint: str = "f") -> str:
        return self.const(np.asarray(val, dtype=np.float32), hint)

    def op(self, op_type: str, inputs, n_out: int = 1, hint: str | None = None, outputs=None, **attrs):
        if outputs is None:
            outputs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=self.name(op_type), **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, hint: str) -> str:
        """x @ w (+ b); w is [in, out] as ONNX MatMul wants."""
        y = self.op("MatMul", [x, self.const(w.astype(np.float32), hint + ".weight")], hint=hint)
        if b is not None:
            y = self.op("Add", [y, self.const(b.astype(np.float32), hint + ".bias")], hint=hint)
        return y

    def model(self, inputs, outputs, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="ember-tools")
        m.ir_version = 9
        onnx.checker.check_model(m)
        return m


def _decoder_io(n_layers: int, n_kv_heads: int, head_dim: int, vocab: int):
    fl = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                      ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", fl, ["batch_size", "sequence_length", vocab])]
    for i in range(n_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kv}", fl,
                ["batch_size", n_kv_heads, "past_sequence_length", head_dim]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kv}", fl,
                ["batch_size", n_kv_heads, "total_sequence_length", head_dim]))
    return inputs, outputs


def _attention_bias(g: G) -> str:
    """Additive mask [B,1,S,T]: causal (query s sits at position P+s) and padding."""
    t_len = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.i64(1)], axis=0)
    s_len = g.op("Gather", [g.op("Shape", ["input_ids"]), g.i64(1)], axis=0)
    past = g.op("Sub", [t_len, s_len])
    zero, one = g.i64(0), g.i64(1)
    rt = g.op("Range", [zero, t_len, one])                       # [T]
    rs = g.op("Add", [g.op("Range", [zero, s_len, one]), past])  # [S] absolute positions
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [rt, g.i64([0])]),
                                  g.op("Unsqueeze", [rs, g.i64([1])])])  # [S,T]
    pad = g.op("Cast", ["attention_mask"], to=TensorProto.BOOL)          # [B,T]
    pad = g.op("Unsqueeze", [pad, g.i64([1, 2])])                        # [B,1,1,T]
    allowed = g.op("And", [causal, pad])                                 # [B,1,S,T]
    return g.op("Where", [allowed, g.f32(0.0), g.f32(-1e9)], hint="attn_bias")


def _split_heads(g: G, x: str, heads: int, head_dim: int) -> str:
    x = g.op("Reshape", [x, g.i64([0, 0, heads, head_dim])])
    return g.op("Transpose", [x], perm=[0, 2, 1, 3])  # [B,H,S,D]


def _attend(g: G, i: int, q: str, k: str, v: str, bias: str, n_heads: int, n_kv: int,
            head_dim: int, outputs_kv: bool = True) -> str:
    """Concat past, write present, scaled dot-product attention; returns [B,S,H*D]."""
    k_all = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2, outputs=[f"present.{i}.key"])
    v_all = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2, outputs=[f"present.{i}.value"])
    if n_kv != n_heads:
        rep = n_heads // n_kv

        def expand(t):
            u = g.op("Unsqueeze", [t, g.i64([2])])                     # [B,KV,1,T,D]
            u = g.op("Concat", [u] * rep, axis=2)                      # [B,KV,rep,T,D]
            return g.op("Reshape", [u, g.i64([0, n_heads, -1, head_dim])])
        k_all, v_all = expand(k_all), expand(v_all)
    kt = g.op("Transpose", [k_all], perm=[0, 1, 3, 2])
    scores = g.op("Mul", [g.op("MatMul", [q, kt]), g.f32(1.0 / np.sqrt(head_dim))])
    probs = g.op("Softmax", [g.op("Add", [scores, bias])], axis=-1)
    ctx = g.op("Transpose", [g.op("MatMul", [probs, v_all])], perm=[0, 2, 1, 3])
    return g.op("Reshape", [ctx, g.i64([0, 0, n_heads * head_dim])])


def gpt2(w: dict, n_layers: int, n_heads: int, eps: float = 1e-5) -> onnx.ModelProto:
    """GPT-2: learned positions, pre-LayerNorm, GELU(tanh) MLP, tied LM head.

    `w` uses the names of tools/demo_models.py's torch module (numpy arrays,
    Linear weights already transposed to [in, out]).
    """
    vocab, d = w["wte"].shape
    hd = d // n_heads
    g = G()
    h = g.op("Add", [g.op("Gather", [g.const(w["wte"], "wte"), "input_ids"], axis=0),
                     g.op("Gather", [g.const(w["wpe"], "wpe"), "position_ids"], axis=0)])
    bias = _attention_bias(g)
    for i in range(n_layers):
        p = f"h.{i}."
        x = g.op("LayerNormalization", [h, g.const(w[p + "ln_1.weight"]), g.const(w[p + "ln_1.bias"])],
                 axis=-1, epsilon=eps)
        qkv = g.linear(x, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"], p + "attn.c_attn")
        q, k, v = g.op("Split", [qkv, g.i64([d, d, d])], n_out=3, axis=-1)
        q, k, v = (_split_heads(g, t, n_heads, hd) for t in (q, k, v))
        ctx = _attend(g, i, q, k, v, bias, n_heads, n_heads, hd)
        h = g.op("Add", [h, g.linear(ctx, w[p + "attn.c_proj.weight"], w[p + "attn.c_proj.bias"],
                                     p + "attn.c_proj")])
        x = g.op("LayerNormalization", [h, g.const(w[p + "ln_2.weight"]), g.const(w[p + "ln_2.bias"])],
                 axis=-1, epsilon=eps)
        m = g.op("Gelu", [g.linear(x, w[p + "mlp.c_fc.weight"], w[p + "mlp.c_fc.bias"], p + "mlp.c_fc")],
                 approximate="tanh")
        h = g.op("Add", [h, g.linear(m, w[p + "mlp.c_proj.weight"], w[p + "mlp.c_proj.bias"],
                                     p + "mlp.c_proj")])
    x = g.op("LayerNormalization", [h, g.const(w["ln_f.weight"]), g.const(w["ln_f.bias"])],
             axis=-1, epsilon=eps)
    g.op("MatMul", [x, g.const(np.ascontiguousarray(w["wte"].T), "lm_head.weight")], outputs=["logits"])
    ins, outs = _decoder_io(n_layers, n_heads, hd, vocab)
    return g.model(ins, outs, "gpt2")


def _rms_norm(g: G, x: str, weight: np.ndarray, eps: float) -> str:
    var = g.op("ReduceMean", [g.op("Mul", [x, x]), g.i64([-1])], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [var, g.f32(eps)])])])
    return g.op("Mul", [g.op("Mul", [x, inv]), g.const(weight.astype(np.float32), "norm.weight")])


def _rope(g: G, x: str, cos: str, sin: str, half: int) -> str:
    x1 = g.op("Slice", [x, g.i64([0]), g.i64([half]), g.i64([-1])])
    x2 = g.op("Slice", [x, g.i64([half]), g.i64([2 * half]), g.i64([-1])])
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])


def llama(w: dict, n_layers: int, n_heads: int, n_kv_heads: int, theta: float = 10000.0,
          eps: float = 1e-5) -> onnx.ModelProto:
    """Llama family: RMSNorm, RoPE (rotate-half), grouped-query attention, SwiGLU, untied head."""
    vocab, d = w["embed_tokens"].shape
    hd = d // n_heads
    g = G()
    h = g.op("Gather", [g.const(w["embed_tokens"], "embed_tokens"), "input_ids"], axis=0)
    bias = _attention_bias(g)
    inv_freq = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
    pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT), g.i64([-1])])
    freqs = g.op("Mul", [pos, g.f32(inv_freq)])                            # [B,S,D/2]
    emb = g.op("Unsqueeze", [g.op("Concat", [freqs, freqs], axis=-1), g.i64([1])])  # [B,1,S,D]
    cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
    for i in range(n_layers):
        p = f"layers.{i}."
        x = _rms_norm(g, h, w[p + "input_layernorm.weight"], eps)
        q = _split_heads(g, g.linear(x, w[p + "q_proj"], None, p + "q_proj"), n_heads, hd)
        k = _split_heads(g, g.linear(x, w[p + "k_proj"], None, p + "k_proj"), n_kv_heads, hd)
        v = _split_heads(g, g.linear(x, w[p + "v_proj"], None, p + "v_proj"), n_kv_heads, hd)
        q, k = _rope(g, q, cos, sin, hd // 2), _rope(g, k, cos, sin, hd // 2)
        ctx = _attend(g, i, q, k, v, bias, n_heads, n_kv_heads, hd)
        h = g.op("Add", [h, g.linear(ctx, w[p + "o_proj"], None, p + "o_proj")])
        x = _rms_norm(g, h, w[p + "post_attention_layernorm.weight"], eps)
        gate = g.linear(x, w[p + "gate_proj"], None, p + "gate_proj")
        up = g.linear(x, w[p + "up_proj"], None, p + "up_proj")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        h = g.op("Add", [h, g.linear(act, w[p + "down_proj"], None, p + "down_proj")])
    x = _rms_norm(g, h, w["norm.weight"], eps)
    g.op("MatMul", [x, g.const(w["lm_head"].astype(np.float32), "lm_head.weight")], outputs=["logits"])
    ins, outs = _decoder_io(n_layers, n_kv_heads, hd, vocab)
    return g.model(ins, outs, "llama")


def lstm(w: dict, n_layers: int) -> onnx.ModelProto:
    """Embedding -> stacked ONNX `LSTM` ops -> Linear, with explicit (h, c) state.

    `w["l{i}.W"]`, `R`, `B` are already in ONNX layout and gate order (i, o, f, c).
    """
    vocab, emb_dim = w["embed"].shape
    hidden = w["l0.R"].shape[-1]
    g = G()
    x = g.op("Gather", [g.const(w["embed"], "embed"), "input_ids"], axis=0)  # [B,S,E]
    x = g.op("Transpose", [x], perm=[1, 0, 2])                               # [S,B,E]
    hs, cs = [], []
    for i in range(n_layers):
        h0 = g.op("Slice", ["h0", g.i64([i]), g.i64([i + 1]), g.i64([0])])
        c0 = g.op("Slice", ["c0", g.i64([i]), g.i64([i + 1]), g.i64([0])])
        y, yh, yc = g.op("LSTM", [x, g.const(w[f"l{i}.W"], f"lstm{i}.W"), g.const(w[f"l{i}.R"], f"lstm{i}.R"),
                                  g.const(w[f"l{i}.B"], f"lstm{i}.B"), "", h0, c0],
                         n_out=3, hidden_size=hidden, direction="forward")
        x = g.op("Squeeze", [y, g.i64([1])])                                 # [S,B,H]
        hs.append(yh)
        cs.append(yc)
    g.op("Concat", hs, axis=0, outputs=["hn"])
    g.op("Concat", cs, axis=0, outputs=["cn"])
    x = g.op("Transpose", [x], perm=[1, 0, 2])                               # [B,S,H]
    y = g.linear(x, w["head.weight"], None, "head")
    g.op("Add", [y, g.const(w["head.bias"].astype(np.float32), "head.bias")], outputs=["logits"])
    fl = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("h0", fl, [n_layers, "batch_size", hidden]),
        helper.make_tensor_value_info("c0", fl, [n_layers, "batch_size", hidden]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", fl, ["batch_size", "sequence_length", vocab]),
        helper.make_tensor_value_info("hn", fl, [n_layers, "batch_size", hidden]),
        helper.make_tensor_value_info("cn", fl, [n_layers, "batch_size", hidden]),
    ]
    return g.model(inputs, outputs, "lstm")
