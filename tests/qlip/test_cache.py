"""The fingerprinted caches: reuse, extension of a shorter run, refusal of other inputs, redo."""

import pytest
import torch

from qlip.pipeline.cache import ChunkStore, StaleCacheError, claim


def _counting(calls):
    def compute(start, stop):
        calls.append((start, stop))
        return {"x": torch.arange(start, stop, dtype=torch.float32)}

    return compute


def test_chunks_are_reused_and_a_longer_run_extends_the_last_one(tmp_path):
    calls = []
    keys = [f"p{i}" for i in range(10)]
    got = ChunkStore(tmp_path, {"steps": 3}, chunk=4).run(keys[:6], _counting(calls), progress=False)
    assert calls == [(0, 4), (4, 6)] and got["x"].tolist() == list(range(6))
    got = ChunkStore(tmp_path, {"steps": 3}, chunk=4).run(keys, _counting(calls), progress=False)
    assert calls[2:] == [(4, 8), (8, 10)]  # chunk 0 reused, the short chunk 4 redone
    assert got["x"].tolist() == list(range(10))


def test_other_items_or_settings_are_refused_unless_redone(tmp_path):
    keys = ["a", "b", "c"]
    ChunkStore(tmp_path, {"steps": 3}, chunk=2).run(keys, _counting([]), progress=False)
    with pytest.raises(StaleCacheError, match="steps: 3 .cached. vs 4 .now."):
        ChunkStore(tmp_path, {"steps": 4}, chunk=2)
    with pytest.raises(StaleCacheError, match="other items"):
        ChunkStore(tmp_path, {"steps": 3}, chunk=2).run(["a", "x", "c"], _counting([]),
                                                         progress=False)
    calls = []
    store = ChunkStore(tmp_path, {"steps": 3}, chunk=2, redo=True)
    assert store.run(["a", "x", "c"], _counting(calls), progress=False)["x"].tolist() == [0, 1, 2]
    assert calls == [(0, 2)]  # only the chunk of other items was computed again
    assert claim(tmp_path / "c", {"a": {"b": 1}}) is False and claim(tmp_path / "c", {"a": {"b": 1}})
    with pytest.raises(StaleCacheError, match="a.b: 1"):
        claim(tmp_path / "c", {"a": {"b": 2}})
