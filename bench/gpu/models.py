"""Timing models for a GPU host that can download nothing: random weights, real shapes.

    python -m bench.gpu.models gguf OUT.gguf --vocab VOCAB.gguf [--gguf-py DIR]
        [--embd 2048 --layers 16 --heads 32 --kv-heads 8 --ff 8192 --ctx 4096]
    python -m bench.gpu.models minilm DIR     # DIR: MiniLM's config and tokenizer (bundle.py)

`gguf`: a llama-architecture F16 GGUF whose tokenizer (every tokenizer.* key) is copied from
one of llama.cpp's vocab-only GGUFs (its models/ folder); weights N(0, 0.02), norms 1. The text
is garbage, but a decode step does the work of a real model of those dimensions (the defaults:
a Llama-3.2-1B-like body, 2.2 GB). Tensors are slices of one random buffer: seconds to write.
`minilm`: a BERT of the configuration in DIR with random weights, written beside it, so
sentence-transformers loads DIR as it would all-MiniLM-L6-v2 and does the same work.
Neither says anything about quality: they are for timing only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def write_gguf(a: argparse.Namespace) -> None:
    if a.gguf_py:
        sys.path.insert(0, a.gguf_py)
    import gguf  # llama.cpp's gguf-py
    import numpy as np

    started = time.perf_counter()
    reader = gguf.GGUFReader(a.vocab)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    head_dim = a.embd // a.heads
    kv_dim = head_dim * a.kv_heads
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("random-llama-for-timing")
    w.add_context_length(a.ctx)
    w.add_embedding_length(a.embd)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ff)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(name, field.contents(), vtype, field.types[1])
            else:
                w.add_key_value(name, field.contents(), vtype)
    rng = np.random.default_rng(a.seed)
    biggest = max(n_vocab * a.embd, a.ff * a.embd) + a.layers * 4099 + 64
    pool = (rng.standard_normal(biggest, dtype=np.float32) * 0.02).astype(np.float16)
    ones = np.ones(a.embd, dtype=np.float32)

    def mat(rows: int, cols: int, offset: int) -> Any:
        return pool[offset:offset + rows * cols].reshape(rows, cols)

    w.add_tensor("token_embd.weight", mat(n_vocab, a.embd, 0))
    for i in range(a.layers):
        o = 4099 * i + 1
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", mat(a.embd, a.embd, o))
        w.add_tensor(f"blk.{i}.attn_k.weight", mat(kv_dim, a.embd, o + 7))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(kv_dim, a.embd, o + 11))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(a.embd, a.embd, o + 13))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(a.ff, a.embd, o + 17))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(a.ff, a.embd, o + 19))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(a.embd, a.ff, o + 23))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", mat(n_vocab, a.embd, 29))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    params = (2 * n_vocab * a.embd
              + a.layers * (2 * a.embd * a.embd + 2 * kv_dim * a.embd + 3 * a.ff * a.embd))
    print(f"wrote {a.out}: random weights, {params / 1e9:.2f}B params, vocab {n_vocab}, "
          f"{a.layers} layers, embd {a.embd}, heads {a.heads}/{a.kv_heads}, ff {a.ff}, "
          f"in {time.perf_counter() - started:.1f}s", flush=True)


def write_minilm(a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(a.seed)
    config = AutoConfig.from_pretrained(a.dir)
    AutoModel.from_config(config).save_pretrained(a.dir, safe_serialization=True)
    print(f"wrote {Path(a.dir) / 'model.safetensors'}: random weights, {config.model_type}, "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    g = sub.add_parser("gguf")
    g.add_argument("out")
    g.add_argument("--vocab", required=True)
    g.add_argument("--gguf-py", default=None, help="a gguf-py folder to import gguf from")
    for name, default in (("embd", 2048), ("layers", 16), ("heads", 32), ("kv-heads", 8),
                          ("ff", 8192), ("ctx", 4096), ("seed", 0)):
        g.add_argument(f"--{name}", type=int, default=default)
    m = sub.add_parser("minilm")
    m.add_argument("dir")
    m.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    write_gguf(a) if a.what == "gguf" else write_minilm(a)


if __name__ == "__main__":
    main()
