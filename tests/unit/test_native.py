"""llama.cpp's log, joined into lines and routed by level (broker.native.LineLog)."""

from __future__ import annotations

import logging

import pytest

from broker.native import LineLog


@pytest.fixture
def lines(caplog):
    logger = logging.getLogger("tokenpool.test-llama")
    caplog.set_level(logging.DEBUG, logger="tokenpool.test-llama")
    logger.setLevel(logging.WARNING)
    return LineLog(logger), caplog


def test_pieces_of_a_warning_become_one_record_and_debug_and_info_lines_are_dropped(lines):
    log, caplog = lines
    log(1, b"ggml_backend_cuda_graph_compute: CUDA Graph id 7 reused\n")  # ggml DEBUG
    log(2, b"llama_context: n_ctx = 1024\n")  # INFO
    log(3, b"llama_context: n_ctx is not divisible")  # WARN, in pieces
    log(5, b" by n_seq_max\n")  # CONT
    log(4, b"failed to decode\n")  # ERROR
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "llama_context: n_ctx is not divisible by n_seq_max"),
        (logging.ERROR, "failed to decode"),
    ]


def test_a_continuation_keeps_the_level_of_the_line_it_continues(lines):
    log, caplog = lines
    log(2, b"print_info: file type")  # INFO, dropped
    log(5, b" = Q4_K - Medium\n")  # its continuation: dropped too
    log(3, b"warning without a newline")
    log(3, b"next warning\n")  # a new line flushes the one before
    assert [r.getMessage() for r in caplog.records] == ["warning without a newline",
                                                         "next warning"]


def test_at_debug_every_line_comes_through_at_its_own_level(lines):
    log, caplog = lines
    log.logger.setLevel(logging.DEBUG)
    log(1, b"a debug line\n")
    log(2, b"an info line\n")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "a debug line"), (logging.INFO, "an info line")]
