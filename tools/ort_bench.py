#!/usr/bin/env python3
"""onnxruntime baseline for `emberd bench`: same model file, same prompt, same
threads and lengths, same JSON keys, so both can be put side by side.

    tools/.venv/bin/python tools/ort_bench.py --model models/kjv-gpt2 [--threads 1]

The prompt is the first N tokens of BENCH_TEXT repeated (as in emberd's
cli::BENCH_TEXT); decoding is greedy with the KV cache / LSTM state fed back,
EOS ignored, exactly as emberd does it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

BENCH_TEXT = "In the beginning God created the heaven and the earth. "


def prompt_ids(tok: Tokenizer, n: int) -> list[int]:
    text = ""
    while True:
        text += BENCH_TEXT
        ids = tok.encode(text, add_special_tokens=False).ids
        if len(ids) >= n:
            return ids[:n]


class Runner:
    """Prefill + step decode through onnxruntime, feeding back the KV cache or
    LSTM state the way Ember's engine does. Also used by tools/demo_models.py."""

    def __init__(self, model: Path, threads: int = 1):
        path = model / "model.onnx" if model.is_dir() else model
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.lstm = "h0" in self.inputs

    def fresh(self) -> dict:
        if self.lstm:
            s = self.inputs["h0"].shape
            z = np.zeros((s[0], 1, s[2]), np.float32)
            return {"h0": z, "c0": z.copy()}
        return {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
                for n, i in self.inputs.items() if n.startswith("past_key_values")}

    def forward(self, ids: list[int], state: dict, past: int):
        """Logits of every position ([len(ids), vocab]) and the new state."""
        feeds = {"input_ids": np.asarray([ids], np.int64), **state}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, past + len(ids)), np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(past, past + len(ids), dtype=np.int64)[None]
        out = dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))
        if self.lstm:
            new = {"h0": out["hn"], "c0": out["cn"]}
        else:
            new = {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}
        return out["logits"][0], new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    load, prefill, ttft, tps = [], [], [], []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        tok = Tokenizer.from_file(str(a.model / "tokenizer.json"))
        r = Runner(a.model, a.threads)
        load.append((time.perf_counter() - t0) * 1e3)
        ids = prompt_ids(tok, a.prompt_tokens)
        t0 = time.perf_counter()
        logits, state = r.forward(ids, r.fresh(), 0)
        t1 = time.perf_counter()
        nxt = int(np.argmax(logits[-1]))
        t2 = time.perf_counter()
        past = len(ids)
        for _ in range(a.gen_tokens - 1):
            logits, state = r.forward([nxt], state, past)
            past += 1
            nxt = int(np.argmax(logits[-1]))
        t3 = time.perf_counter()
        prefill.append((t1 - t0) * 1e3)
        ttft.append((t2 - t0) * 1e3)
        tps.append((a.gen_tokens - 1) / (t3 - t2) if a.gen_tokens > 1 else 0.0)
    print(json.dumps({
        "runtime": f"onnxruntime {ort.__version__}",
        "model": str(a.model), "threads": a.threads, "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens, "runs": a.runs,
        "load_ms": statistics.median(load), "prefill_ms": statistics.median(prefill),
        "ttft_ms": statistics.median(ttft), "decode_tokens_per_s": statistics.median(tps),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
