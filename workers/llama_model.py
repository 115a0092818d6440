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
from workers.engine import Sampling, Sink, TokenLogprob

log = logging.getLogger("tokenpool.llama")

PENALTY_LAST_N = 64  # llama-cpp-python's default window for repeat_penalty
# The widest set of highest logits the grammar is asked about before the whole vocabulary:
# llama.cpp's grammar filter costs about 28 ms over Gemma's 262,144 tokens on 2 cores, 2 ms
# over these, and np.partition finds them in 0.4 ms.
GRAMMAR_WIDE = 16_384
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


@dataclass(eq=False)
class Chain:
    """A request's llama.cpp sampler chain, and what the candidate shortcut needs to know."""

    sampler: Any  # llama-cpp-python's LlamaSampler
    top: int | None  # the chain keeps at most this many highest logits (None: it may keep any)
    penalised: bool  # penalties lower the logits of the tokens in `history`
    history: deque[int] = field(default_factory=lambda: deque(maxlen=PENALTY_LAST_N))
    grammar: Any = None  # a LlamaSampler holding only the job's grammar sampler
    # min-p's reach below the best allowed logit (ln 1/min_p; llama.cpp's min-p compares raw
    # logits): an allowed token further below can never be picked. None: no such bound.
    cut: float | None = None

    def reach(self) -> int | None:
        """How many of the highest logits the chain can pick from: its top, plus every token
        a penalty may push below them."""
        if self.top is None:
            return None
        return self.top + (len(set(self.history)) if self.penalised else 0)


def at_or_above(row: np.ndarray, k: int) -> np.ndarray | None:
    """Ids of every token whose logit is at least the k-th highest (ties included)."""
    if k >= row.shape[0] or np.isnan(row).any():
        return None
    threshold = np.partition(row, -k)[-k]
    return np.flatnonzero(row >= threshold).astype(np.int32)


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


PREFILL_ROWS = 4  # repacked Q4_K weights multiply groups of this many rows with one kernel


class LlamaBackend:
    """One llama.cpp context shared by `n_seq` sequences. Unified, its KV cache lets sequences
    share cells of a common prefix; invariant, every sequence has a KV stream of its own and
    the kernels compute a row alike whatever else is in the batch (`InvariantBatchEngine`).
    Invariant with a `prefill_batch` on the CPU, a second context on repacked weights computes the
    prompts (`prefill_rows`); weights it does not repack are mapped from the same file."""

    def __init__(self, path: Path, n_ctx_seq: int, n_seq: int, n_gpu_layers: int,
                 n_threads: int | None, n_batch: int, unified: bool = True,
                 repack: bool = True, prefill_batch: int = 0) -> None:
        from llama_cpp import llama_cpp

        self.C = llama_cpp
        choose_kernels(not unified)
        system = llama_cpp.llama_print_system_info()
        # CPU weight repacking (faster GEMM kernels, but groups of 4 rows round differently
        # from the rest)
        self.model = self._load(path, n_gpu_layers, extra_buffers(repack and unified, system))
        threads = n_threads or os.cpu_count() or 1
        self.unified = unified
        self.can_share = True
        self.context = self._context(self.model, n_ctx_seq * n_seq, n_seq, n_batch, threads)
        self.ctx = self.logits_ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._buf = ctypes.create_string_buffer(256)
        self.shortcut = True  # sample among the few reachable logits (off: all of them)
        self._state = (ctypes.c_uint8 * 0)()  # a sequence's cells, copied
        self.prefill_rows = 0
        self.prefill_model: Any = None
        self.prefill_context: Any = None
        if prefill_batch and not unified and n_gpu_layers == 0 and extra_buffers(True, system):
            self.prefill_model = self._load(path, 0, True)
            # room for a last chunk's padding past the end of the longest prompt
            self.prefill_context = self._context(self.prefill_model,
                                                 (n_ctx_seq + PREFILL_ROWS) * n_seq, n_seq,
                                                 prefill_batch, threads)
            self.prefill_memory = llama_cpp.llama_get_memory(self.prefill_context.ctx)
            self.prefill_rows = PREFILL_ROWS

    def _load(self, path: Path, n_gpu_layers: int, extra_bufts: bool) -> Any:
        from llama_cpp import _internals

        mparams = self.C.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_extra_bufts = extra_bufts
        # verbose: llama.cpp's log goes through broker.native's filter; verbose=False would
        # point fd 2 at /dev/null for the load, and its warnings with it.
        return _internals.LlamaModel(path_model=str(path), params=mparams, verbose=True)

    def _context(self, model: Any, n_ctx: int, n_seq: int, n_batch: int, threads: int) -> Any:
        from llama_cpp import _internals

        cparams = self.C.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = cparams.n_threads_batch = threads
        # Unified: cells can belong to several sequences (shared prefixes). Not unified: one
        # KV stream per sequence, its cells in position order whoever else comes and goes
        # (attention adds them up in cell order); prefixes are copied between streams.
        cparams.kv_unified = self.unified
        if not self.unified:  # the attention paths InvariantBatchEngine steers around
            cparams.flash_attn_type = self.C.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.swa_full = True  # so a sequence can be cut back to a shared prefix
        return _internals.LlamaContext(model=model, params=cparams, verbose=True)

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        self._decode_in(self.ctx, entries)

    def prefill(self, entries: list[tuple[int, int, int, bool]]) -> None:
        assert self.prefill_context is not None
        self._decode_in(self.prefill_context.ctx, entries)

    def _decode_in(self, ctx: Any, entries: list[tuple[int, int, int, bool]]) -> None:
        batch = self.batch
        for i, (token, pos, seq, wants) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = wants
        batch.n_tokens = len(entries)
        self.logits_ctx = ctx
        code = self.C.llama_decode(ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def to_prefill(self, seq: int) -> None:
        assert self.prefill_context is not None
        self._copy(self.ctx, self.prefill_context.ctx, seq, seq)

    def forget_prefill(self, seq: int, from_pos: int) -> None:
        self.C.llama_memory_seq_rm(self.prefill_memory, seq, from_pos, -1)

    def from_prefill(self, seq: int, n_tokens: int) -> None:
        assert self.prefill_context is not None
        self.forget_prefill(seq, n_tokens)  # the padding
        self._copy(self.prefill_context.ctx, self.ctx, seq, seq)

    def _copy(self, src: Any, dst: Any, src_seq: int, dst_seq: int) -> None:
        """Copy a sequence's cells, in llama.cpp's sequence state: they replace what
        `dst_seq` held, in its own KV stream, in position order from its first cell."""
        size = self.C.llama_state_seq_get_size(src, src_seq)
        if len(self._state) < size:
            self._state = (ctypes.c_uint8 * size)()
        if (self.C.llama_state_seq_get_data(src, self._state, size, src_seq) != size
                or self.C.llama_state_seq_set_data(dst, self._state, size, dst_seq) != size):
            raise RuntimeError(f"copying the cells of sequence {src_seq} failed")

    def sampler_for(self, request: Request) -> Chain:
        from llama_cpp import _internals

        sampling = request.sampling
        chain = _internals.LlamaSampler()
        chain.add_penalties(self.n_vocab, PENALTY_LAST_N, sampling.repeat_penalty,
                            sampling.frequency_penalty, sampling.presence_penalty)
        penalised = (sampling.repeat_penalty != 1 or sampling.frequency_penalty != 0
                     or sampling.presence_penalty != 0)
        top = chain_top(sampling) if self.shortcut else None
        if sampling.temperature == 0:
            chain.add_greedy()
        else:
            seed = sampling.seed if sampling.seed is not None else random.randrange(2**32)
            chain.add_top_k(sampling.top_k)
            chain.add_top_p(sampling.top_p, 1)
            chain.add_min_p(sampling.min_p, 1)
            chain.add_temp(sampling.temperature)
            chain.add_dist(seed)
        made = Chain(chain, top, penalised)
        if sampling.grammar is not None:
            made.grammar = self._grammar(sampling.grammar)
            if sampling.temperature > 0 and sampling.min_p > 0 and not penalised:
                made.cut = float(np.log(1 / sampling.min_p))
            for token in request.tokens[len(request.tokens) - sampling.resumed:]:
                self.C.llama_sampler_accept(made.grammar.sampler, token)
        return made

    def _grammar(self, grammar: str) -> Any:
        from llama_cpp import _internals

        pointer = self.C.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not pointer:  # the API checked it parses: a bug, or another llama.cpp
            raise ValueError("llama.cpp cannot parse the job's grammar")
        holder = _internals.LlamaSampler()
        self.C.llama_sampler_chain_add(holder.sampler, pointer)  # freed with the holder
        return holder

    def sample(self, request: Request, batch_index: int) -> int:
        """The request's chain picks the next token from row `batch_index` of the last decode:
        from a small superset of the logits it can pick (workers/candidates.py) where the
        chain allows, else from the whole vocabulary. Both pick the same token."""
        if request.sampler is None:
            request.sampler = self.sampler_for(request)
        chain = cast(Chain, request.sampler)
        reach = chain.reach()
        token: int | None
        if chain.grammar is not None:
            token = self._sample_constrained(chain, batch_index, reach)
        else:
            token = None if reach is None else self._sample_among(chain, batch_index, reach)
        if token is None:
            token = int(self.C.llama_sampler_sample(chain.sampler.sampler, self.logits_ctx,
                                                    batch_index))
        chain.history.append(token)
        return token

    def _row(self, batch_index: int) -> np.ndarray:
        logits = self.C.llama_get_logits_ith(self.logits_ctx, batch_index)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,))

    def _sample_among(self, chain: Chain, batch_index: int, reach: int) -> int | None:
        """The chain's pick among a superset of the row's `reach` highest logits; None where
        no superset can be had (the caller samples the whole row)."""
        row = self._row(batch_index)
        ids = top_superset(row, reach)
        if ids is None:
            return None
        return self._pick(chain, ids, row[ids], 0)

    def _sample_constrained(self, chain: Chain, batch_index: int, reach: int | None) -> int:
        """The chain's pick among the tokens the grammar allows. The grammar is asked about a
        few dozen highest logits first, then about a thousand, then GRAMMAR_WIDE. Each set
        holds every token above its lowest logit, so the pick among its allowed tokens is the
        pick among all allowed tokens when at least `reach` of them are allowed (top-k's or
        greedy's), or when min-p cuts every token below that lowest logit (an allowed token
        outside would only add its sliver of probability to top-p's sum). Else, and at a
        grammar's end (only end-of-generation allowed), the grammar filters the whole
        vocabulary, as llama.cpp's own grammar path does."""
        row = self._row(batch_index)
        if reach is not None:
            for k in (max(reach, 32), 1024, GRAMMAR_WIDE):
                ids = top_superset(row, k) if k <= 1024 else at_or_above(row, k)
                if ids is None:
                    continue
                logits = row[ids]
                token = self._pick(chain, ids, logits, reach, float(logits.min()))
                if token is not None:
                    return token
        token = self._pick(chain, np.arange(self.n_vocab, dtype=np.int32), row, 1)
        if token is None:
            raise ValueError("the grammar allows no token here")
        return token

    def _pick(self, chain: Chain, ids: np.ndarray, logits: np.ndarray, need: int,
              floor: float | None = None) -> int | None:
        """The chain's pick among `ids` (after the grammar's filter, if the chain has one,
        left at least `need` of them, or min-p cuts below `floor`), accepted by the chain and
        the grammar; else None."""
        data = np.zeros(ids.shape[0], dtype=TOKEN_DATA)
        data["id"], data["logit"] = ids, logits
        if chain.grammar is not None:
            self.C.llama_sampler_apply(chain.grammar.sampler, ctypes.byref(self._array(data)))
            data = data[data["logit"] != -np.inf]
            cut_below = (chain.cut is not None and floor is not None and data.shape[0] > 0
                         and float(data["logit"].max()) - floor >= chain.cut)
            if data.shape[0] < max(need, 1) and not cut_below:
                return None
        array = self._array(data)
        self.C.llama_sampler_apply(chain.sampler.sampler, ctypes.byref(array))
        token = int(array.data[array.selected].id)
        self.C.llama_sampler_accept(chain.sampler.sampler, token)
        if chain.grammar is not None:
            self.C.llama_sampler_accept(chain.grammar.sampler, token)
        return token

    def _array(self, data: np.ndarray) -> Any:
        return self.C.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(self.C.llama_token_data)),
            size=data.shape[0], selected=-1, sorted=False)

    def logprob(self, batch_index: int, token: int, top: int) -> TokenLogprob:
        """From the model's own distribution (the row's softmax, before any sampler), as
        OpenAI and llama-server report them."""
        row = self._row(batch_index).astype(np.float64)
        peak = row.max()
        log_total = peak + np.log(np.exp(row - peak).sum())
        entry = self._entry(token, float(row[token] - log_total))
        if top:
            best = np.argpartition(row, -top)[-top:]
            best = best[np.argsort(-row[best], kind="stable")]
            entry["top_logprobs"] = [self._entry(int(t), float(row[t] - log_total))
                                     for t in best]
        else:
            entry["top_logprobs"] = []
        return entry

    def _entry(self, token: int, logprob: float) -> TokenLogprob:
        piece = self.piece(token)
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(piece)}

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
        # Across KV streams: the donor's cells, copied now (llama.cpp's seq_cp would copy its
        # whole stream, and only at the next decode), then cut back to the prefix.
        self._copy(self.ctx, self.ctx, src, dst)
        self.C.llama_memory_seq_rm(self.memory, dst, n_tokens, -1)

    def close(self) -> None:
        self.C.llama_batch_free(self.batch)
        if self.prefill_context is not None:
            self.prefill_context.close()
            self.prefill_model.close()
        self.context.close()
        self.model.close()


class LlamaModel:
    """The TextModel of a generation worker: up to `max_batch` generations at once."""

    def __init__(self, path: Path, n_ctx: int, n_gpu_layers: int, n_threads: int | None,
                 max_batch: int = 1, prompt_chunk: int = 128, invariant: bool = False,
                 prefill: bool = True) -> None:
        n_batch = max(512, prompt_chunk + max_batch)
        self.n_ctx = n_ctx
        engine = InvariantBatchEngine if invariant else BatchEngine
        self.backend = LlamaBackend(path, n_ctx, engine.sequences(max_batch), n_gpu_layers,
                                    n_threads, n_batch, unified=not invariant,
                                    prefill_batch=max(2, prompt_chunk) if prefill else 0)
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
