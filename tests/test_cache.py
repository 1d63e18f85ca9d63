"""The attention cache: round trip, atomic writes, corruption, concurrent appends."""

import json
import multiprocessing as mp
import os

import pytest
import torch

from l2s.inversion import cache as cache_mod
from l2s.inversion.cache import AttentionCache, CacheError, content_key


def _maps(seed=0):
    return torch.rand(3, 2, 5, 16, 16, generator=torch.Generator().manual_seed(seed))


def _meta(**kw):
    return {"source": "shapes", "source_id": "s1", "split": "train", "relation": "above",
            "polarity": "pos", "image_hash": "h", **kw}


def test_round_trip_and_manifest(tmp_path):
    c = AttentionCache(tmp_path, "fp")
    k = content_key("a", 1)
    assert not c.has(k) and c.get(k) is None
    c.put(k, _maps(), _meta())
    e = c.get(k)
    assert e.maps.dtype == torch.float16 and e.maps.shape == (3, 2, 5, 16, 16)
    torch.testing.assert_close(e.maps.float(), _maps(), atol=1e-3, rtol=1e-3)
    assert e.meta["relation"] == "above" and e.meta["shape"] == [3, 2, 5, 16, 16]
    assert [r["key"] for r in c.manifest()] == [k]
    s = c.stats()
    assert s["entries"] == 1 and s["by_polarity"] == {"pos": 1} and s["bytes"] > 0


def test_failed_write_leaves_no_entry_and_no_temp_file(tmp_path, monkeypatch):
    c = AttentionCache(tmp_path, "fp")

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")  # a partial file, as on a full disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "save_file", boom)
    with pytest.raises(OSError):
        c.put("ab" * 32, _maps(), _meta())
    assert not c.has("ab" * 32)
    assert not list(c.dir.rglob("*.safetensors")) and not list(c.dir.rglob(".tmp-*"))
    assert c.manifest() == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape"])
def test_corrupt_entry_is_detected_deleted_and_reported(tmp_path, damage):
    c = AttentionCache(tmp_path, "fp")
    k = content_key("x")
    c.put(k, _maps(), _meta())
    p = c.map_path(k)
    if damage == "truncate":
        p.write_bytes(p.read_bytes()[:100])
    elif damage == "garbage":
        p.write_bytes(b"\x00" * 64)
    else:  # a valid file whose header disagrees with its tensor
        other = content_key("y")
        c.put(other, _maps()[:2], _meta())
        os.replace(c.map_path(other), p)
    assert c.get(k) is None
    assert k in c.corrupt and not p.exists()
    assert list(c.entries()) == []


def _writer(root, worker, n):
    c = AttentionCache(root, "fp")
    for i in range(n):
        c.put(content_key(worker, i), _maps(i)[:1], _meta(source_id=f"{worker}-{i}"))


def test_two_processes_append_to_one_cache_safely(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 40)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    c = AttentionCache(tmp_path, "fp")
    lines = c.manifest_path.read_text().splitlines()
    assert len(lines) == 80 and all(json.loads(x)["key"] for x in lines)
    assert len(c.manifest()) == 80 and len(list(c.entries())) == 80


def test_unwritable_cache_dir_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.write_text("a file, not a folder")
    # was: "cache folder ro/fp is not writable (Not a directory)"
    with pytest.raises(CacheError, match=f"cache folder {ro}: {ro} is a file, not a folder: "
                                         "pass another --cache-dir"):
        AttentionCache(ro, "fp")
    with pytest.raises(CacheError, match="is a file, not a folder"):
        AttentionCache(ro / "sub", "fp")


def test_latents_round_trip_and_corruption(tmp_path):
    c = AttentionCache(tmp_path, "fp")
    lat = torch.randn(10, 4, 8, 8)
    c.put_latents("cd" * 32, lat, {"psnr": 31.5})
    got, meta = c.get_latents("cd" * 32)
    torch.testing.assert_close(got, lat.half())  # stored as fp16
    assert meta["psnr"] == 31.5
    c.latent_path("cd" * 32).write_bytes(b"junk")
    assert c.get_latents("cd" * 32) is None and "cd" * 32 in c.corrupt


def test_atomic_write_text_replaces_the_file_whole_and_leaves_no_temp_file(tmp_path):
    from l2s.inversion.cache import atomic_write_text

    path = tmp_path / "sub" / "settings.json"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "é second\n")
    assert path.read_text(encoding="utf-8") == "é second\n"
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_respect_the_umask_not_mkstemps_owner_only_mode(tmp_path, umask):
    """Bug caught: the atomic writers kept mkstemp's 0600, so cache entries, classifier cards,
    config files and bench images of a shared cache or a GenEval run were unreadable to others."""
    import numpy as np

    from l2s.bench import store
    from l2s.classifier.model import ClassifierConfig, RelationClassifier, save_classifier
    from l2s.inversion.cache import atomic_write_text

    old = os.umask(umask)
    try:
        c = AttentionCache(tmp_path / "cache", "fp")
        k = content_key("a", 1)
        c.put(k, _maps(), _meta())
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        store.save_image(tmp_path / "bench" / "0000.png", np.zeros((4, 4, 3), np.uint8), 0, 0.1)
        store.write_metadata(tmp_path / "bench", "plain", 0, {"prompt": "x"})
        card = save_classifier(RelationClassifier(ClassifierConfig(n_maps=4, map_size=8, d_model=16,
                                                                  head_hidden=16)),
                               {}, tmp_path / "clf")
        written = [c.map_path(k), tmp_path / "config.yaml", tmp_path / "bench" / "0000.png",
                   store.prompt_dir(tmp_path / "bench", "plain", 0) / "metadata.jsonl",
                   card, card.parent / "model.safetensors"]
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == \
        {p.name: oct(0o666 & ~umask) for p in written}


def test_a_killed_writers_temp_files_are_removed_and_a_live_writers_kept(tmp_path):
    """Catches temp files of a writer killed between writing and renaming (SIGKILL: no
    cleanup runs) left in the cache forever, and a sweep that deletes a live writer's."""
    import os
    import subprocess
    import sys
    import time

    from l2s import locks
    from l2s.inversion.cache import remove_dead_temp_files, temp_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_start = locks.process_start(dead.pid)
    dead.wait()
    host = locks.owner_text().split()[0]
    (tmp_path / "maps" / "ab").mkdir(parents=True)
    gone = tmp_path / "maps" / "ab" / f".tmp-{host}+{dead.pid}+{dead_start}+x1.safetensors"
    live = tmp_path / "maps" / "ab" / f"{temp_prefix()}x2.safetensors"
    fresh_unnamed = tmp_path / ".tmp-abc123.json"
    old_unnamed = tmp_path / ".tmp-def456.json"
    for p in (gone, live, fresh_unnamed, old_unnamed):
        p.write_bytes(b"")
    t = time.time() - 2 * 3600
    os.utime(old_unnamed, (t, t))
    assert remove_dead_temp_files(tmp_path) == 2
    assert not gone.exists() and not old_unnamed.exists()
    assert live.exists() and fresh_unnamed.exists()
