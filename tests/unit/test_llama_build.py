"""llama.cpp's AMX kernels crash in their first matmul (ggml-org/llama.cpp#20824): the Makefile
builds without them, and a build that has them runs without the buffers that reach them."""

from __future__ import annotations

import logging
import os
import platform

import pytest

from workers.llama_model import extra_buffers

AMX_BUILD = b"CPU : AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | REPACK = 1 | "
PLAIN_BUILD = b"CPU : AVX2 = 1 | AVX512 = 1 | LLAMAFILE = 1 | REPACK = 1 | "


def test_an_amx_build_runs_without_extra_buffers_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="tokenpool.llama"):
        assert extra_buffers(True, AMX_BUILD) is False
    assert "ggml-org/llama.cpp#20824" in caplog.text


def test_other_builds_keep_the_repacked_weights_unless_told_not_to() -> None:
    assert extra_buffers(True, PLAIN_BUILD) is True
    assert extra_buffers(False, PLAIN_BUILD) is False
    assert extra_buffers(False, AMX_BUILD) is False


@pytest.mark.skipif(platform.machine() != "x86_64", reason="AMX is x86 only")
def test_the_installed_llama_cpp_has_no_amx_kernels() -> None:
    from llama_cpp import llama_cpp

    info = llama_cpp.llama_print_system_info()
    assert b"AVX2 = 1" in info  # native everywhere else
    assert b"AMX_INT8 = 1" not in info


def test_every_backend_turns_the_tiled_matmul_off_unless_told_and_says_when_told(
        monkeypatch, caplog):
    from workers.llama_model import choose_kernels

    monkeypatch.delenv("GGML_CPU_TILED_MM", raising=False)
    choose_kernels(invariant=False)  # a fast model first: a later hot-swap may need it off
    assert os.environ["GGML_CPU_TILED_MM"] == "0"
    assert not caplog.records
    monkeypatch.setenv("GGML_CPU_TILED_MM", "1")
    choose_kernels(invariant=False)
    assert os.environ["GGML_CPU_TILED_MM"] == "1" and not caplog.records  # told: kept
    choose_kernels(invariant=True)
    assert "may depend on the batch" in caplog.text
