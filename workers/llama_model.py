"""The llama.cpp text model (llama-cpp-python's low-level API), resident for the life of the
worker: one context with a KV cache sequence per batch slot, decoded by a `BatchEngine`."""

from __future__ import annotations

import ctypes
import logging
import os
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from workers.batching import BatchEngine, InvariantBatchEngine, Request, run_to_end
from workers.candidates import top_superset
from workers.engine import Sampling, Sink

log = logging.getLogger("tokenpool.llama")

PENALTY_LAST_N = 64  # llama-cpp-python's default window for repeat_penalty
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


@dataclass(eq=False)
class Chain:
    """A request's llama.cpp sampler chain, and what the candidate shortcut needs to know."""

    sampler: Any  # llama-cpp-python's LlamaSampler
    top: int | None  # the chain keeps at most this many highest logits (None: it may keep any)
    penalised: bool  # penalties lower the logits of the tokens in `history`
    history: deque[int] = field(default_factory=lambda: deque(maxlen=PENALTY_LAST_N))

    def reach(self) -> int | None:
        """How many of the highest logits the chain can pick from: its top, plus every token
        a penalty may push below them."""
        if self.top is None:
            return None
        return self.top + (len(set(self.history)) if self.penalised else 0)


def chain_top(sampling: Sampling) -> int | None:
    """The number of highest logits a chain for `sampling` picks among, when that is known
    before the penalties: greedy picks one, top-k keeps k. Penalties below their neutral
    values raise logits, and a raised token may come from anywhere: None."""
    if (sampling.repeat_penalty < 1 or sampling.frequency_penalty < 0
            or sampling.presence_penalty < 0):
        return None
    if sampling.temperature == 0:
        return 1
    return sampling.top_k if sampling.top_k > 0 else None


def extra_buffers(repack: bool, system_info: bytes) -> bool:
    """Whether to let llama.cpp put weights in its extra CPU buffers (repacked for faster
    kernels). A build with AMX kernels puts them in AMX buffers, whose matmul crashes on first
    use (ggml-org/llama.cpp#20824): such a build runs without extra buffers, slower but sound.
    The Makefile builds llama-cpp-python without AMX."""
    if repack and b"AMX_INT8 = 1" in system_info:
        log.warning("llama.cpp was built with AMX kernels, which crash (ggml-org/llama.cpp"
                    "#20824): running without repacked weights; rebuild it with `make install`")
        return False
    return repack


def choose_kernels(invariant: bool) -> None:
    """An invariant backend needs llama.cpp's CPU matmul to give a row the same arithmetic at
    any row count, but its tiled K-quant kernel takes over from 8 rows on and rounds unlike
    the per-row dot products below that: GGML_CPU_TILED_MM=0 turns it off. llama.cpp reads the
    switch once per process, at its first matmul, and a worker can hot-swap from a model
    without batch invariance to one with it: so every backend runs without the tiled kernel
    unless the environment says otherwise. It costs a non-invariant model's prompts a little
    (ad hoc, repacked weights, a 504-token prompt: 743-745 ms with it, 780-835 ms without)."""
    os.environ.setdefault("GGML_CPU_TILED_MM", "0")
    if invariant and os.environ["GGML_CPU_TILED_MM"] != "0":
        log.warning("GGML_CPU_TILED_MM=%s: llama.cpp's tiled matmul is on, so this "
                    "batch_invariant model's tokens may depend on the batch",
                    os.environ["GGML_CPU_TILED_MM"])


class LlamaBackend:
    """One llama.cpp context shared by `n_seq` sequences. Unified, its KV cache lets sequences
    share cells of a common prefix; invariant, every sequence has a KV stream of its own and
    the kernels compute a row alike whatever else is in the batch (`InvariantBatchEngine`)."""

    def __init__(self, path: Path, n_ctx_seq: int, n_seq: int, n_gpu_layers: int,
                 n_threads: int | None, n_batch: int, unified: bool = True,
                 repack: bool = True) -> None:
        from llama_cpp import _internals, llama_cpp

        self.C = llama_cpp
        choose_kernels(not unified)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # CPU weight repacking (faster GEMM kernels, but groups of 4 rows round differently
        # from the rest)
        mparams.use_extra_bufts = extra_buffers(repack and unified,
                                                llama_cpp.llama_print_system_info())
        self.model = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=False)
        threads = n_threads or os.cpu_count() or 1
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx_seq * n_seq
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = threads
        # Unified: cells can belong to several sequences (shared prefixes). Not unified: one
        # KV stream per sequence, its cells in position order whoever else comes and goes
        # (attention adds them up in cell order); prefixes are copied between streams.
        cparams.kv_unified = unified
        self.unified = unified
        self.can_share = True
        if not unified:  # the attention paths InvariantBatchEngine steers around are these
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.swa_full = True  # so a sequence can be cut back to a shared prefix
        self.context = _internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._buf = ctypes.create_string_buffer(256)
        self.shortcut = True  # sample among the few reachable logits (off: all of them)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        for i, (token, pos, seq, wants) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = wants
        batch.n_tokens = len(entries)
        code = self.C.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def sampler_for(self, sampling: Sampling) -> Chain:
        from llama_cpp import _internals

        chain = _internals.LlamaSampler()
        chain.add_penalties(self.n_vocab, PENALTY_LAST_N, sampling.repeat_penalty,
                            sampling.frequency_penalty, sampling.presence_penalty)
        penalised = (sampling.repeat_penalty != 1 or sampling.frequency_penalty != 0
                     or sampling.presence_penalty != 0)
        top = chain_top(sampling) if self.shortcut else None
        if sampling.temperature == 0:
            chain.add_greedy()
            return Chain(chain, top, penalised)
        seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
        chain.add_top_k(sampling.top_k)
        chain.add_top_p(sampling.top_p, 1)
        chain.add_min_p(sampling.min_p, 1)
        chain.add_temp(sampling.temperature)
        chain.add_dist(seed)
        return Chain(chain, top, penalised)

    def sample(self, request: Request, batch_index: int) -> int:
        """The request's chain picks the next token from row `batch_index` of the last decode:
        from a small superset of the logits it can pick (workers/candidates.py) where the
        chain allows, else from the whole vocabulary. Both pick the same token."""
        if request.sampler is None:
            request.sampler = self.sampler_for(request.sampling)
        chain = cast(Chain, request.sampler)
        reach = chain.reach()
        token = None if reach is None else self._sample_among(chain, batch_index, reach)
        if token is None:
            token = int(self.C.llama_sampler_sample(chain.sampler.sampler, self.ctx, batch_index))
        chain.history.append(token)
        return token

    def _sample_among(self, chain: Chain, batch_index: int, reach: int) -> int | None:
        """The chain's pick among a superset of the row's `reach` highest logits; None where
        no superset can be had (the caller samples the whole row)."""
        logits = self.C.llama_get_logits_ith(self.ctx, batch_index)
        row = np.ctypeslib.as_array(logits, shape=(self.n_vocab,))
        ids = top_superset(row, reach)
        if ids is None:
            return None
        data = np.zeros(ids.shape[0], dtype=TOKEN_DATA)
        data["id"], data["logit"] = ids, row[ids]
        array = self.C.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(self.C.llama_token_data)),
            size=ids.shape[0], selected=-1, sorted=False)
        self.C.llama_sampler_apply(chain.sampler.sampler, ctypes.byref(array))
        token = int(array.data[array.selected].id)
        self.C.llama_sampler_accept(chain.sampler.sampler, token)
        return token

    def is_eog(self, token: int) -> bool:
        return bool(self.C.llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int) -> bytes:
        n = self.C.llama_token_to_piece(self.vocab, token, self._buf, len(self._buf), 0, False)
        return self._buf.raw[:n] if n >= 0 else b""

    def forget(self, seq: int, from_pos: int) -> None:
        self.C.llama_memory_seq_rm(self.memory, seq, from_pos, -1)

    def share(self, src: int, dst: int, n_tokens: int) -> None:
        if n_tokens <= 0:
            return
        if self.unified:
            self.C.llama_memory_seq_cp(self.memory, src, dst, 0, n_tokens)
            return
        # Across KV streams llama.cpp copies a whole stream (at the next decode), then the
        # copy is cut back to the prefix.
        self.C.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        self.C.llama_memory_seq_rm(self.memory, dst, n_tokens, -1)

    def close(self) -> None:
        self.C.llama_batch_free(self.batch)
        self.context.close()
        self.model.close()


class LlamaModel:
    """The TextModel of a generation worker: up to `max_batch` generations at once."""

    def __init__(self, path: Path, n_ctx: int, n_gpu_layers: int, n_threads: int | None,
                 max_batch: int = 1, prompt_chunk: int = 128, invariant: bool = False) -> None:
        n_batch = max(512, prompt_chunk + max_batch)
        self.n_ctx = n_ctx
        engine = InvariantBatchEngine if invariant else BatchEngine
        self.backend = LlamaBackend(path, n_ctx, engine.sequences(max_batch), n_gpu_layers,
                                    n_threads, n_batch, unified=not invariant)
        self.engine = engine(self.backend, max_batch, n_ctx, n_batch, prompt_chunk)

    @property
    def batches(self) -> int:
        """Decode steps so far (each serves every active job at once)."""
        return self.engine.steps

    def tokenize(self, text: str, special: bool, add_bos: bool = True) -> list[int]:
        return list(self.backend.model.tokenize(text.encode(), add_bos, special))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.backend.model.detokenize(list(tokens)).decode(errors="replace")

    def generate(self, tokens: list[int], sampling: Sampling, sink: Sink) -> None:
        run_to_end(self.engine, Request(tokens=list(tokens), sampling=sampling,
                                        max_new=sampling.max_tokens, sink=sink))

    def close(self) -> None:
        self.engine.close()
        self.backend.close()
