from pathlib import Path

import pytest
from pydantic import ValidationError

from broker.keys import Keys, stream_id
from broker.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("REDIS_URL", "TOKENPOOL_REDIS_URL", "TOKENPOOL_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_need_no_files_chat_and_summary_are_gemma_embed_is_minilm():
    s = Settings()
    assert set(s.models) == {"chat", "summary", "embed"}
    assert s.models["chat"].source == s.models["summary"].source == "bundled:gemma3-270m"
    assert s.models["embed"].kind == "embedding" and s.models["embed"].dimensions == 384
    assert s.redis_url is None


def test_redis_url_is_read_from_plain_redis_url(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.1:6380/2")
    assert Settings().redis_url == "redis://10.0.0.1:6380/2"


def test_a_nested_env_var_changes_one_model_and_keeps_the_others(monkeypatch):
    monkeypatch.setenv("TOKENPOOL_MODELS__SUMMARY__N_CTX", "512")
    s = Settings()
    assert s.models["summary"].n_ctx == 512
    assert s.models["summary"].source == "bundled:gemma3-270m"
    assert set(s.models) == {"chat", "summary", "embed"}


def test_a_config_file_adds_a_model_and_disables_one(tmp_path: Path, monkeypatch):
    cfg = tmp_path / "tokenpool.toml"
    cfg.write_text('key_prefix = "tp"\n[models.big]\nkind = "llm"\nsource = "/m/big.gguf"\n'
                   'gpu = "1"\n[models.embed]\nenabled = false\n')
    monkeypatch.setenv("TOKENPOOL_CONFIG", str(cfg))
    s = Settings()
    assert s.key_prefix == "tp"
    assert set(s.models) == {"chat", "summary", "big"}
    assert s.models["big"].gpu == "1"


@pytest.mark.parametrize("off", ["false", "False", "0", "no", "off"])
def test_enabled_false_from_the_environment_removes_a_model(monkeypatch, off):
    monkeypatch.setenv("TOKENPOOL_MODELS__EMBED__ENABLED", off)
    assert set(Settings().models) == {"chat", "summary"}


def test_enabled_true_from_the_environment_keeps_a_model_and_nonsense_names_the_field(
        monkeypatch):
    monkeypatch.setenv("TOKENPOOL_MODELS__EMBED__ENABLED", "true")
    assert "embed" in Settings().models
    monkeypatch.setenv("TOKENPOOL_MODELS__EMBED__ENABLED", "maybe")
    with pytest.raises(ValidationError, match=r"models\.embed\.enabled"):
        Settings()


def test_a_bad_value_names_its_field(monkeypatch):
    monkeypatch.setenv("TOKENPOOL_MODELS__CHAT__N_CTX", "-5")
    with pytest.raises(ValidationError, match="n_ctx"):
        Settings()


def test_every_redis_name_carries_the_prefix():
    k = Keys("tp")
    assert k.events("j1") == "tp:job:j1:events"
    assert k.channel("j1") == "tp:job:j1"
    assert k.channel_pattern() == "tp:job:*"
    assert k.queue("chat") == "tp.chat"
    assert stream_id(7) == "7-1"



def test_up_materialises_each_bundled_model_once_and_leaves_paths_alone(monkeypatch, tmp_path):
    import cli.up

    calls = []
    monkeypatch.setattr(cli.up, "resolve", lambda source, cache: calls.append(source))
    monkeypatch.setenv("TOKENPOOL_MODELS__BIG__KIND", "llm")
    monkeypatch.setenv("TOKENPOOL_MODELS__BIG__SOURCE", str(tmp_path / "missing.gguf"))
    cli.up.prepare_bundled(Settings())
    assert calls == ["bundled:all-minilm-l6-v2", "bundled:gemma3-270m"]


def test_llm_models_are_batch_invariant_unless_told_otherwise_and_summary_is_told():
    from broker.settings import ModelSpec, default_models

    assert ModelSpec(kind="llm", source="x.gguf").batch_invariant is True
    models = default_models()
    assert models["chat"].batch_invariant is True
    assert models["summary"].batch_invariant is False  # prompt-heavy: the fastest kernels


def test_prompt_chunks_are_llama_servers_batch_on_a_gpu_unless_configured():
    from broker.settings import Settings
    from workers.gpu import prompt_chunk

    models = Settings().models
    assert models["chat"].prompt_chunk_tokens is None
    assert prompt_chunk(None, 0) == 128  # the CPU: prompts never stall decoding jobs long
    assert prompt_chunk(None, -1) == prompt_chunk(None, 12) == 2048
    assert prompt_chunk(models["summary"].prompt_chunk_tokens, -1) == 512  # set: kept
    assert prompt_chunk(64, 0) == 64


def test_batch_invariance_is_kept_on_the_cpu_only_and_never_promised_on_a_gpu():
    from broker.settings import ModelSpec
    from workers.runtime import batch_invariant_on

    llm = ModelSpec(kind="llm", source="x.gguf")
    assert batch_invariant_on(llm, "cpu") is True
    assert batch_invariant_on(llm, "0") is False  # CUDA kernels depend on the batch
    assert batch_invariant_on(llm.model_copy(update={"n_gpu_layers": 0}), "0") is True
    assert batch_invariant_on(llm.model_copy(update={"batch_invariant": False}), "cpu") is False
    assert batch_invariant_on(ModelSpec(kind="embedding", source="d"), "cpu") is False
