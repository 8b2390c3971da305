"""Build Ember's demo models and test fixtures, reproducibly.

    python tools/demo_models.py [--out models] [--fixtures tests/fixtures] [--steps-gpt2 300] ...

Steps (fixed seeds throughout):
 1. corpus: the King James Bible from Debian's `bible-kjv` (public domain),
    one verse per line; the last 1% of verses is held out (models/heldout.txt);
 2. tokenizer: byte-level BPE, vocab 4096, trained on the corpus; its 256-symbol
    byte alphabet means any UTF-8 text (Chinese, emoji) encodes and round-trips;
 3. kjv-gpt2: GPT-2 (4 layers, 256 wide, 4 heads, context 256) trained for a few
    CPU minutes (fixed step count), exported with an Optimum-style KV cache, int8 `quantize_dynamic`;
 4. kjv-lstm: 2-layer LSTM LM (hidden 256), ONNX `LSTM` ops with explicit state,
    int8 dynamic on MatMul/Gather only;
 5. per model: config.json, golden.json (onnxruntime greedy continuations and
    top-5 logits), SHA256SUMS;
 6. fixtures for tests: random-weight Llama (RoPE, GQA; fp32 and per-channel
    int8) and fp32 GPT-2 of other shapes, plus deliberately broken models.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnxruntime.quantization import QuantType, quantize_dynamic
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).parent))
import onnx_graphs  # noqa: E402
from ort_bench import Runner  # noqa: E402

EOS = "<|endoftext|>"
PROMPTS = {
    "english": "In the beginning God created",
    "chinese": "今天天气很好，",
    "one_token": "And",
}
GOLDEN_TOKENS = 32
TOP5_STEPS = [0, 1, 8, 31]


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---------------------------------------------------------------- corpus ---
def corpus() -> list[str]:
    if shutil.which("bible") is None:
        sys.exit("the `bible` command is missing: apt-get install bible-kjv")
    raw = subprocess.run(["bible", "gen1:1-rev22:21"], check=True, capture_output=True,
                         text=True).stdout
    verses: list[str] = []
    # Blocks separated by blank lines alternate "Book N" headings and verse
    # runs; in a run, a verse starts with its right-aligned number.
    for block in re.split(r"\n\s*\n", raw):
        lines = block.strip("\n").splitlines()
        if len(lines) == 1 and not re.match(r"^\s*\d+ [a-z]", lines[0]) and not lines[0].startswith(" "):
            continue  # a heading such as "Genesis 1" or "1 Samuel 3"
        for line in lines:
            m = re.match(r"^\s*\d+ (.*)$", line)
            if m:
                verses.append(m.group(1).strip())
            elif verses:
                verses[-1] += " " + line.strip()
    return verses


# ------------------------------------------------------------- tokenizer ---
def train_tokenizer(lines: list[str], vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer)
    for text in ["今天天气很好，", "emoji 🔥 ok", "Ünïcödé\n\ttabs"]:
        assert tok.decode(tok.encode(text).ids) == text, text
    return tok


def token_stream(tok: Tokenizer, lines: list[str]) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    nl = tok.encode("\n").ids  # one verse a line, as in models/heldout.txt
    ids: list[int] = []
    for enc in tok.encode_batch(lines):
        ids.extend(enc.ids)
        ids.extend(nl)
    ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------- torch models ---
class GPT2Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(a.transpose(1, 2).reshape(b, s, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(GPT2Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.T

    def onnx_weights(self) -> dict:
        t = lambda p: p.detach().numpy().astype(np.float32)  # noqa: E731
        w = {"wte": t(self.wte.weight), "wpe": t(self.wpe.weight),
             "ln_f.weight": t(self.ln_f.weight), "ln_f.bias": t(self.ln_f.bias)}
        for i, b in enumerate(self.blocks):
            p = f"h.{i}."
            for name, mod in [("ln_1", b.ln_1), ("ln_2", b.ln_2)]:
                w[p + name + ".weight"], w[p + name + ".bias"] = t(mod.weight), t(mod.bias)
            for name, mod in [("attn.c_attn", b.c_attn), ("attn.c_proj", b.c_proj),
                              ("mlp.c_fc", b.c_fc), ("mlp.c_proj", b.mlp_proj)]:
                w[p + name + ".weight"], w[p + name + ".bias"] = t(mod.weight).T.copy(), t(mod.bias)
        return w


class LSTMLM(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        self.layers = layers

    def forward(self, ids):
        y, _ = self.lstm(self.embed(ids))
        return self.head(y)

    def onnx_weights(self) -> dict:
        t = lambda p: p.detach().numpy().astype(np.float32)  # noqa: E731
        w = {"embed": t(self.embed.weight), "head.weight": t(self.head.weight).T.copy(),
             "head.bias": t(self.head.bias)}

        def reorder(a):  # torch gates (i, f, g, o) -> ONNX gates (i, o, f, c)
            i, f, g, o = np.split(a, 4, axis=0)
            return np.concatenate([i, o, f, g], axis=0)
        for i in range(self.layers):
            w[f"l{i}.W"] = reorder(t(getattr(self.lstm, f"weight_ih_l{i}")))[None]
            w[f"l{i}.R"] = reorder(t(getattr(self.lstm, f"weight_hh_l{i}")))[None]
            w[f"l{i}.B"] = np.concatenate([reorder(t(getattr(self.lstm, f"bias_ih_l{i}"))),
                                           reorder(t(getattr(self.lstm, f"bias_hh_l{i}")))])[None]
        return w


def train(model: nn.Module, data: np.ndarray, seq: int, batch: int, steps: int, lr: float) -> float:
    """AdamW, warmup then cosine decay; a fixed step count so reruns are reproducible."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    data_t = torch.from_numpy(data)
    loss_avg, t0 = None, time.time()
    model.train()
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = lr * min(1.0, (step + 1) / 30) * (0.1 + 0.45 * (1 + np.cos(np.pi * step / steps)))
        starts = rng.integers(0, len(data) - seq - 1, size=batch)
        x = torch.stack([data_t[s:s + seq] for s in starts])
        y = torch.stack([data_t[s + 1:s + seq + 1] for s in starts])
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        if step % 25 == 0:
            log(f"  step {step}/{steps} loss {loss_avg:.3f} ({time.time() - t0:.0f} s)")
    model.eval()
    log(f"  trained {steps} steps in {time.time() - t0:.0f} s, final loss {loss_avg:.3f}")
    return loss_avg


# ------------------------------------------------------ onnxruntime runs ---
class OrtLM(Runner):
    """onnxruntime reference runs (one thread), with greedy goldens."""

    def greedy(self, ids: list[int], n: int):
        state, past = self.fresh(), 0
        logits, state = self.forward(ids, state, past)
        past += len(ids)
        out, steps, margins = [], [], []
        last = logits[-1]
        for step in range(n):
            order = np.argsort(-last, kind="stable")
            margins.append(round(float(last[order[0]] - last[order[1]]), 6))
            if step in TOP5_STEPS:
                steps.append({"step": step, "ids": order[:5].tolist(),
                              "logits": [float(last[j]) for j in order[:5]]})
            nxt = int(order[0])
            out.append(nxt)
            logits, state = self.forward([nxt], state, past)
            past += 1
            last = logits[-1]
        return out, steps, margins


def golden(model_dir: Path, tok: Tokenizer) -> float:
    lm = OrtLM(model_dir / "model.onnx")
    cases, worst_gap = [], float("inf")
    for name, text in PROMPTS.items():
        ids = tok.encode(text).ids
        if name == "one_token":
            assert len(ids) == 1, ids
        out, top5, margins = lm.greedy(ids, GOLDEN_TOKENS)
        worst_gap = min(worst_gap, min(margins))
        # top1_margins[i]: logit gap between the best and second-best token at step i, so a
        # test can tell a real divergence from a near-tie that rounding may legitimately flip.
        cases.append({"name": name, "prompt": text, "prompt_ids": ids, "greedy_ids": out,
                      "greedy_text": tok.decode(out), "top5": top5, "top1_margins": margins})
    doc = {"made_with": f"onnxruntime {ort.__version__}", "threads": 1, "tokens": GOLDEN_TOKENS,
           "cases": cases}
    (model_dir / "golden.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return worst_gap


def sha256sums(model_dir: Path) -> None:
    lines = []
    for f in sorted(model_dir.iterdir()):
        if f.name != "SHA256SUMS" and f.is_file():
            lines.append(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n")
    (model_dir / "SHA256SUMS").write_text("".join(lines))


class _Calibration:
    """Calibration feeds for static quantization: a few prompts, empty cache."""

    def __init__(self, path: Path, tok: Tokenizer):
        lm = OrtLM(path)
        self.feeds = []
        for text in ["In the beginning God created the heaven", "And the LORD spake unto Moses, saying",
                     "今天天气很好，"]:
            ids = tok.encode(text).ids
            f = {"input_ids": np.asarray([ids], np.int64), **lm.fresh()}
            if not lm.lstm:
                f["attention_mask"] = np.ones((1, len(ids)), np.int64)
                f["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
            self.feeds.append(f)
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def save(model: onnx.ModelProto, out_dir: Path, tok: Tokenizer, config: dict, quant: str | None,
         per_channel: bool = False, static: str | None = None) -> None:
    """Write model.onnx (quantized when `quant` names the op types), tokenizer, config, goldens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.iterdir():
        if f.is_file():
            f.unlink()
    with tempfile.TemporaryDirectory() as td:
        fp32 = Path(td) / "fp32.onnx"
        onnx.save(model, fp32)
        if static:
            from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
            fmt = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[static]
            reader = type("Reader", (_Calibration, CalibrationDataReader), {})(fp32, tok)
            quantize_static(str(fp32), str(out_dir / "model.onnx"), reader, quant_format=fmt,
                            op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=per_channel,
                            # A quantized output layer would make logits discrete (exact ties).
                            nodes_to_exclude=[n.name for n in model.graph.node if "logits" in n.output])
        elif quant:
            quantize_dynamic(str(fp32), str(out_dir / "model.onnx"), weight_type=QuantType.QInt8,
                             per_channel=per_channel, op_types_to_quantize=quant.split(","))
        else:
            shutil.copy(fp32, out_dir / "model.onnx")
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    gap = golden(out_dir, tok)
    sha256sums(out_dir)
    size = (out_dir / "model.onnx").stat().st_size
    log(f"  {out_dir}: model.onnx {size / 1e6:.2f} MB, smallest greedy top-1 margin {gap:.4f}")
    if gap < 1e-3:
        log("  WARNING: a greedy step is nearly tied; goldens may be fragile")


def check_export(torch_model: nn.Module, onnx_model: onnx.ModelProto, ids: np.ndarray) -> None:
    """The hand-built fp32 graph must compute what the trained torch module computes."""
    with tempfile.TemporaryDirectory() as td:
        p = Path(td) / "m.onnx"
        onnx.save(onnx_model, p)
        lm = OrtLM(p)
        ours, _ = lm.forward(ids.tolist(), lm.fresh(), 0)
    with torch.no_grad():
        ref = torch_model(torch.from_numpy(ids)[None])[0].numpy()
    err = np.abs(ours - ref).max()
    log(f"  fp32 ONNX vs torch max |diff| = {err:.2e}")
    assert err < 1e-3, err


# ------------------------------------------------------------- fixtures ---
def random_llama(vocab: int, d: int, layers: int, heads: int, kv_heads: int, ffn: int, seed: int,
                 std: float = 0.2) -> dict:
    rng = np.random.default_rng(seed)
    hd = d // heads
    r = lambda *s, std=std: (rng.standard_normal(s) * std).astype(np.float32)  # noqa: E731
    w = {"embed_tokens": r(vocab, d, std=1.0), "norm.weight": 1 + r(d, std=0.1),
         "lm_head": r(d, vocab, std=1.0)}
    for i in range(layers):
        p = f"layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + r(d, std=0.1),
              p + "post_attention_layernorm.weight": 1 + r(d, std=0.1),
              p + "q_proj": r(d, heads * hd), p + "k_proj": r(d, kv_heads * hd),
              p + "v_proj": r(d, kv_heads * hd), p + "o_proj": r(heads * hd, d),
              p + "gate_proj": r(d, ffn), p + "up_proj": r(d, ffn), p + "down_proj": r(ffn, d)}
    return w


def random_gpt2(vocab: int, d: int, layers: int, ctx: int, seed: int) -> dict:
    torch.manual_seed(seed)
    m = GPT2(vocab, d, layers, 2, ctx)  # the head count does not change the weights
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3 if d < 256 else 0.03)
    return m.onnx_weights()


def fixtures(out: Path, tok: Tokenizer) -> None:
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id(EOS)
    llama_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
                 "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 128,
                 "bos_token_id": eos, "eos_token_id": eos}
    lw = random_llama(vocab, 64, 2, 4, 2, 96, seed=1)
    lm = onnx_graphs.llama(lw, 2, 4, 2)
    log("fixture tiny-llama-gqa (fp32)")
    save(lm, out / "tiny-llama-gqa", tok, llama_cfg, quant=None)
    log("fixture tiny-llama-gqa-int8 (per-channel)")
    save(lm, out / "tiny-llama-gqa-int8", tok, llama_cfg, quant="MatMul", per_channel=True)
    gcfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab, "n_embd": 48,
            "n_layer": 3, "n_head": 2, "n_positions": 64, "bos_token_id": eos, "eos_token_id": eos}
    log("fixture tiny-gpt2 (fp32)")
    g2 = onnx_graphs.gpt2(random_gpt2(vocab, 48, 3, 64, seed=2), 3, 2)
    save(g2, out / "tiny-gpt2", tok, gcfg, quant=None)
    for fmt in ("qdq", "qoperator"):
        log(f"fixture tiny-gpt2-{fmt} (static int8, {fmt})")
        save(g2, out / f"tiny-gpt2-{fmt}", tok, gcfg, quant=None, static=fmt)

    # A graph whose I/O follows neither family.
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "wrong_io",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    d = out / "wrong-io"
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), d / "model.onnx")
    tok.save(str(d / "tokenizer.json"))
    # A decoder-shaped graph using an operator tract does not know (an onnxruntime contrib op).
    nodes = [helper.make_node("SparseAttention", ["input_ids"], ["logits"], domain="com.microsoft")]
    g = helper.make_graph(nodes, "unsupported", [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])])
    d = out / "unsupported-op"
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                  helper.make_opsetid("com.microsoft", 1)]), d / "model.onnx")
    tok.save(str(d / "tokenizer.json"))


def smollm(out: Path) -> None:
    """SmolLM-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536,
    vocab 49152, context 2048) with random weights, int8 dynamic: a benchmark of
    a real-sized Llama, made at bench time and never committed. The demo
    tokenizer is padded with placeholder tokens up to the vocabulary."""
    vocab = 49152
    tok = Tokenizer.from_file(str(Path(__file__).resolve().parent.parent / "models/kjv-gpt2/tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(tok.get_vocab_size(), vocab)])
    assert tok.get_vocab_size() == vocab, tok.get_vocab_size()
    eos = tok.token_to_id(EOS)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "max_position_embeddings": 2048,
           "rope_theta": 10000.0, "bos_token_id": eos, "eos_token_id": eos}
    # std 0.02 (the usual initialisation) keeps 30 residual layers finite.
    w = random_llama(vocab, 576, 30, 9, 3, 1536, seed=4, std=0.02)
    save(onnx_graphs.llama(w, 30, 9, 3), out, tok, cfg, quant="MatMul,Gather")


# ------------------------------------------------------------------ main ---
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="models")
    ap.add_argument("--fixtures", default="tests/fixtures")
    ap.add_argument("--steps-gpt2", type=int, default=300)
    ap.add_argument("--steps-lstm", type=int, default=400)
    ap.add_argument("--only", choices=["gpt2", "lstm", "fixtures", "big", "smollm"], action="append")
    ap.add_argument("--big-out", default="target/bench-models/gpt2-big-int8",
                    help="where --only big writes its random-weight model (not committed)")
    ap.add_argument("--smollm-out", default="target/bench-models/smollm-135m-int8",
                    help="where --only smollm writes its random-weight model (not committed)")
    args = ap.parse_args()
    only = set(args.only or ["gpt2", "lstm", "fixtures"])
    if "smollm" in only:
        log("bench model: random SmolLM-135M-shaped Llama, int8")
        smollm(Path(args.smollm_out))
        only.discard("smollm")
        if not only:
            return
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(args.out)
    out.mkdir(exist_ok=True)

    log("corpus: bible-kjv")
    verses = corpus()
    n_hold = len(verses) // 100
    train_lines, held = verses[:-n_hold], verses[-n_hold:]
    (out / "heldout.txt").write_text("\n".join(held) + "\n")
    log(f"  {len(verses)} verses, {n_hold} held out")
    log("tokenizer: byte-level BPE, vocab 4096")
    tok = train_tokenizer(train_lines, 4096)
    data = token_stream(tok, train_lines)
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
    log(f"  {len(data)} training tokens")
    probe = data[:40]

    if "gpt2" in only:
        log("kjv-gpt2: training")
        m = GPT2(vocab, 256, 4, 4, 256)
        loss = train(m, data, seq=256, batch=8, steps=args.steps_gpt2, lr=3e-3)
        graph = onnx_graphs.gpt2(m.onnx_weights(), 4, 4)
        check_export(m, graph, probe)
        cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
               "n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 256, "bos_token_id": eos,
               "eos_token_id": eos, "ember_training": {"steps": args.steps_gpt2, "batch": "8x256", "final_loss": round(loss, 3)}}
        save(graph, out / "kjv-gpt2", tok, cfg, quant="MatMul,Gather")
    if "lstm" in only:
        log("kjv-lstm: training")
        m = LSTMLM(vocab, 256, 2)
        loss = train(m, data, seq=128, batch=16, steps=args.steps_lstm, lr=5e-3)
        graph = onnx_graphs.lstm(m.onnx_weights(), 2)
        check_export(m, graph, probe)
        cfg = {"architectures": ["LSTMLanguageModel"], "model_type": "lstm", "vocab_size": vocab,
               "hidden_size": 256, "num_layers": 2, "bos_token_id": eos, "eos_token_id": eos,
               "ember_training": {"steps": args.steps_lstm, "batch": "16x128", "final_loss": round(loss, 3)}}
        save(graph, out / "kjv-lstm", tok, cfg, quant="MatMul,Gather")
    if "fixtures" in only:
        fixtures(Path(args.fixtures), tok)
    if "big" in only:
        # Regression benchmark for large int8 layers (4 M weights per MLP matrix,
        # above tract's 4 MiB constant-folding budget once widened to i32).
        log("bench model: random GPT-2, 1024 wide, 4 layers, int8")
        cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab, "n_embd": 1024,
               "n_layer": 4, "n_head": 16, "n_positions": 512, "bos_token_id": eos, "eos_token_id": eos}
        w = random_gpt2(vocab, 1024, 4, 512, seed=3)
        save(onnx_graphs.gpt2(w, 4, 16), Path(args.big_out), tok, cfg, quant="MatMul,Gather")
    log("done")


if __name__ == "__main__":
    main()
