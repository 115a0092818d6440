"""Where a benchmark's latest result goes: bench/results/<name>.md, or a tagged name beside it."""

from __future__ import annotations

import pytest

import bench.record as record


def test_a_result_is_written_under_its_name_and_a_tag_keeps_it_beside_the_untagged_one(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(record, "RESULTS", tmp_path)
    with record.recorded("batching"):
        print("ratio 1.02")
    monkeypatch.setattr(record, "TAG", "gpulike")
    with record.recorded("batching"):
        print("ratio 0.94")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batching-gpulike.md", "batching.md"]
    assert "ratio 1.02" in (tmp_path / "batching.md").read_text()
    tagged = (tmp_path / "batching-gpulike.md").read_text()
    assert "ratio 0.94" in tagged and tagged.startswith("_") and "cores" in tagged.splitlines()[0]
    assert capsys.readouterr().out == "ratio 1.02\nratio 0.94\n"  # printed as well


def test_a_block_that_fails_records_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(record, "RESULTS", tmp_path)
    with pytest.raises(RuntimeError), record.recorded("overhead"):
        print("half a table")
        raise RuntimeError("the stack never came up")
    assert list(tmp_path.iterdir()) == []
