"""Owner files (``l2s.locks``): one run per output folder, claims in a shared cache, and when
a holder counts as gone (a dead or reused pid at once, another machine's silence after ten
minutes)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from l2s import locks
from l2s.inversion.cache import AttentionCache, writers


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def sleeper():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def _age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_live_holder_keeps_its_file_and_a_dead_or_reused_pid_loses_it_at_once(
        tmp_path, sleeper):
    """Catches a reused pid keeping a dead process's claim alive (pid alone was checked)."""
    path = tmp_path / "claim"
    here = socket.gethostname()
    path.write_text(f"{here} {sleeper.pid} {locks.process_start(sleeper.pid)}\n")
    assert locks.take(path).pid == sleeper.pid
    path.write_text(f"{here} {sleeper.pid} 1\n")  # that pid now runs another process
    assert locks.take(path) is None
    assert path.read_text().split()[:2] == [here, str(os.getpid())]
    locks.release(path)
    path.write_text(f"{here} {_dead_pid()}\n")  # an old claim of a dead process
    assert locks.take(path) is None
    locks.release(path)
    assert not path.exists()


def test_another_machines_file_is_taken_over_after_ten_minutes_without_a_heartbeat(
        tmp_path, monkeypatch):
    """Catches an invert killed on another host blocking its images for six hours."""
    path = tmp_path / "claim"
    path.write_text("elsewhere 123 4567\n")
    _age(path, 60)
    assert locks.take(path).host == "elsewhere"  # its heartbeat is recent: alive
    _age(path, locks.STALE_S + 1)
    assert locks.take(path) is None
    locks.release(path)
    path.write_text("elsewhere 123\n")  # written before heartbeats: the old six hours
    _age(path, locks.STALE_S + 1)
    assert locks.take(path) is not None
    _age(path, locks.OLD_STALE_S + 1)
    assert locks.take(path) is None
    # The heartbeat touches what this process holds, so others never see it as silent.
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(locks, "_thread", None)
    locks.release(path)
    assert locks.take(path) is None
    _age(path, 3600)
    deadline = time.time() + 5
    while time.time() - path.stat().st_mtime > 60 and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() - path.stat().st_mtime < 60
    locks.release(path)


def test_cache_claims_use_the_same_rules_and_writers_names_live_ones(tmp_path, sleeper):
    a = AttentionCache(tmp_path / "cache", "fp")
    (a.dir / "claims").mkdir()
    (a.dir / "claims" / "img").write_text(
        f"{socket.gethostname()} {sleeper.pid} {locks.process_start(sleeper.pid)}\n")
    assert not a.claim("img") and writers(a.dir) == [f"pid {sleeper.pid}"]
    (a.dir / "claims" / "img").write_text(f"{socket.gethostname()} {sleeper.pid} 1\n")
    assert a.claim("img") and writers(a.dir) == []  # taken over; this process is no other
    a.release("img")


def test_an_invert_that_left_images_to_another_process_keeps_the_source_unfinished(
        tmp_path, monkeypatch, one_thread):
    """Catches the inverting mark removed while another process still held claims: `train
    --data` then trained on 28 of 32 images without a word."""
    from l2s.engine.loading import load_backbone
    from l2s.inversion.job import InvertConfig, run_invert
    from l2s.inversion.loop import InversionConfig

    den = load_backbone("toy")
    cfg = InvertConfig(cache_dir=str(tmp_path / "c"), limit=2, batch_size=1,
                       inversion=InversionConfig(method="noise"))
    claim = AttentionCache.claim
    taken = []

    def one_taken(self, key):  # another process holds the first image
        if not taken:
            taken.append(key)
            return False
        return claim(self, key)

    monkeypatch.setattr(AttentionCache, "claim", one_taken)
    res = run_invert(cfg, den)
    assert res.left_to_others == 2 and res.written == 2
    cache = AttentionCache(tmp_path / "c", den.fingerprint)
    assert cache.sources_to_invert(["shapes"]) == ["shapes"]  # not finished
    monkeypatch.undo()
    res = run_invert(cfg, den)
    assert res.written == 2 and cache.sources_to_invert(["shapes"]) == []


def test_two_trainings_on_one_out_are_refused_naming_the_other(tmp_path, sleeper, one_thread):
    """Catches two `l2s train` on one --out writing one checkpoint's epochs in turn."""
    from test_train import FakeBackbone, _cfg, make_cache

    from l2s.classifier.train import LOCK_NAME, run_train

    make_cache(tmp_path / "cache", n_images=24)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(
        f"{socket.gethostname()} {sleeper.pid} {locks.process_start(sleeper.pid)}\n")
    with pytest.raises(locks.LockError, match=rf"in use by another l2s train \(pid "
                                              rf"{sleeper.pid}, .*delete .*\.lock"):
        run_train(_cfg(tmp_path, epochs=1), FakeBackbone())
    sleeper.kill()
    sleeper.wait()
    res = run_train(_cfg(tmp_path, epochs=1), FakeBackbone())
    assert res.card_path.exists() and not (out / LOCK_NAME).exists()
    assert "cache_being_written" not in res.card["data"]


def test_training_while_another_process_writes_the_cache_says_so(tmp_path, sleeper,
                                                                  one_thread):
    """Catches `train --invert never` on a cache being written training on a partial
    snapshot without a warning."""
    from test_train import FP, FakeBackbone, _cfg, make_cache

    from l2s.classifier.train import run_train

    cache = make_cache(tmp_path / "cache", n_images=24)
    assert cache.dir.name == FP
    (cache.dir / "inverting-shapes").write_text(
        f"{socket.gethostname()} {sleeper.pid} {locks.process_start(sleeper.pid)}\n")
    res = run_train(_cfg(tmp_path, epochs=1, invert="never"), FakeBackbone())
    assert res.card["data"]["cache_being_written"] == [f"pid {sleeper.pid}"]


def _read_only(monkeypatch, folder) -> None:
    """Make ``folder`` act as a read-only mount: writing, replacing or deleting there fails."""
    import builtins
    import errno
    import io

    real_open, real_unlink, real_replace = builtins.open, os.unlink, os.replace
    frozen = str(folder)

    def refuse(path):
        if str(path).startswith(frozen):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def ro_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(io, "open", ro_open)
    monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (refuse(p), real_unlink(p, *a, **k)))
    monkeypatch.setattr(os, "replace", lambda s, d, *a, **k: (refuse(d),
                                                              real_replace(s, d, *a, **k)))


def test_a_read_only_cache_trains_with_invert_never(tmp_path, monkeypatch, one_thread):
    """Catches `train --invert never` refusing a cache it only reads ("cache folder ... is
    not writable"): a read-only mount or another user's shared cache. A broken entry there is
    left out, not deleted, and the card says it is still there."""
    from test_train import FP, FakeBackbone, _cfg, make_cache

    from l2s.classifier.train import run_train

    cache = make_cache(tmp_path / "cache", n_images=24)
    broken = sorted((cache.dir / "maps").glob("*/*.safetensors"))[0]
    broken.write_bytes(broken.read_bytes()[:100])
    _read_only(monkeypatch, cache.dir)
    res = run_train(_cfg(tmp_path, epochs=1, invert="never"), FakeBackbone())
    assert res.card["data"]["corrupt_dropped"] == 1 and broken.exists()
    assert res.card["data"]["corrupt_left_in_cache"] == 1
    with pytest.raises(Exception, match="is not writable"):  # inverting into it still fails
        AttentionCache(tmp_path / "cache", FP)


def test_a_read_only_cache_is_not_said_to_have_lost_its_broken_entries(tmp_path, monkeypatch):
    """Catches the warning "N broken cache entries were deleted" (and "has been deleted" when
    every entry is broken) from a run that could delete nothing: the cache was read-only."""
    from test_train import _cli, make_cache
    from typer.testing import CliRunner

    cache = make_cache(tmp_path / "cache", n_images=24)
    entries = sorted((cache.dir / "maps").glob("*/*.safetensors"))
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    app = _cli(monkeypatch)
    _read_only(monkeypatch, cache.dir)
    args = ["--model", "synthetic", "--cache-dir", str(tmp_path / "cache"), "--epochs", "1",
            "--d-model", "32", "--depth", "1", "--device", "cpu", "--invert", "never"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "deleted" not in text, text
    assert "1 broken cache entries were left out (recorded in the card) and are still in the " \
           "cache, which this run cannot change (read-only)" in text
    monkeypatch.undo()  # the rest of the entries broken too
    for e in entries[1:]:
        e.write_bytes(e.read_bytes()[:100])
    app = _cli(monkeypatch)
    _read_only(monkeypatch, cache.dir)
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b")])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "Traceback" not in text, text
    assert "deleted" not in text and "left in place" in text, text
    assert all(e.exists() for e in entries)



def _stale(path):
    path.write_text(f"{socket.gethostname()} {_dead_pid()}\n")


TAKER = """
import sys, time
from pathlib import Path
from l2s import locks
path, barrier = Path(sys.argv[1]), sys.argv[2]
if barrier != "-":  # both takers have judged the file gone before either acts on it
    real = locks.is_gone
    def judged(h, _first=[True]):
        gone = real(h)
        if _first:
            _first.clear()
            Path(barrier, str(__import__("os").getpid())).touch()
            while len(list(Path(barrier).iterdir())) < 2:
                time.sleep(0.005)
        return gone
    locks.is_gone = judged
print("took" if locks.take(path) is None else "refused", flush=True)
sys.stdin.read()  # hold the file until told to go
"""


def _taker(path, barrier="-"):
    import os as _os

    env = {**_os.environ, "PYTHONPATH": _os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", TAKER, str(path), str(barrier)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def test_a_stale_lock_taken_over_meanwhile_by_another_process_is_not_taken_again(
        tmp_path, monkeypatch):
    """Catches the double takeover: this process judged a dead holder's lock gone, another
    process took the lock over before this one removed it, and this one then deleted the
    other's live lock and created its own (both went on writing one folder)."""
    path = tmp_path / ".lock"
    _stale(path)
    real, other = locks.is_gone, []

    def judged_then_overtaken(h):
        gone = real(h)
        if not other:  # between this judgement and its takeover, another process takes it
            other.append(_taker(path))
            assert other[0].stdout.readline().strip() == "took"
        return gone

    monkeypatch.setattr(locks, "is_gone", judged_then_overtaken)
    try:
        got = locks.take(path)
        assert got is not None and got.pid == other[0].pid, "both processes took the lock"
        assert path.read_text().split()[1] == str(other[0].pid)
    finally:
        other[0].communicate("")


def test_two_processes_that_both_find_one_stale_lock_do_not_both_take_it(tmp_path):
    """Catches the double takeover with two real processes that both judged the same dead
    holder's lock gone before either acted: exactly one may take it, the other must see the
    winner's live lock."""
    for round_ in range(4):
        path = tmp_path / f".lock{round_}"
        _stale(path)
        barrier = tmp_path / f"barrier{round_}"
        barrier.mkdir()
        procs = [_taker(path, barrier) for _ in range(2)]
        said = [p.stdout.readline().strip() for p in procs]
        owner = path.read_text().split()[1]
        for p in procs:
            p.communicate("")
        assert sorted(said) == ["refused", "took"], said
        assert owner == str(procs[said.index("took")].pid)


def test_silence_is_measured_on_the_folders_clock_not_this_machines(tmp_path, monkeypatch):
    """Catches another machine's lock judged by this machine's wall clock: a clock one hour
    fast stole a live holder's lock, one an hour slow held a dead holder's for an extra hour.
    A probe file stamped by the folder's own clock gives "now"."""
    path = tmp_path / "claim"
    real_time = time.time
    monkeypatch.setattr(locks, "_offsets", {})
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # this clock runs fast
    path.write_text("elsewhere 123 4567\n")  # touched just now by its live holder
    assert locks.take(path).host == "elsewhere"
    monkeypatch.setattr(locks, "_offsets", {})
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)  # this clock runs slow
    _age_real = real_time() - locks.STALE_S - 60
    os.utime(path, (_age_real, _age_real))  # silent for 11 minutes: its holder is gone
    assert locks.take(path) is None
    locks.release(path)


def test_a_heartbeat_far_in_the_future_is_neither_taken_over_nor_held_in_silence(
        tmp_path, sleeper):
    """Catches a lock whose holder's clock runs a day ahead: by the wall-clock rule it looked
    alive for a day plus ten minutes (a clock years ahead: forever), and nothing said why."""
    from l2s.inversion.cache import writers

    out = tmp_path / "out"
    out.mkdir()
    path = out / ".lock"
    path.write_text("elsewhere 123 4567\n")
    ahead = time.time() + 86400
    os.utime(path, (ahead, ahead))
    h = locks.take(path)
    assert h is not None and h.ahead > 86000  # not taken over
    with pytest.raises(locks.LockError, match=r"pid 123 on elsewhere, whose heartbeat is 24 h "
                                              r"ahead .*clocks .* disagree.*delete .*\.lock"):
        with locks.exclusive(path, "l2s train", out):
            pass
    assert path.read_text() == "elsewhere 123 4567\n"
    # A claim in a shared cache names the same holder among the cache's writers.
    (out / "claims").mkdir()
    os.replace(path, out / "claims" / "img")
    assert writers(out) == ["pid 123 on elsewhere, whose heartbeat is 24 h ahead of this "
                            "folder's clock"]
    # Within the tolerance a heartbeat slightly ahead is a live holder, as a recent one.
    soon = time.time() + 60
    os.utime(out / "claims" / "img", (soon, soon))
    assert writers(out) == ["pid 123 on elsewhere"]


def test_a_lock_error_says_how_long_the_holder_has_run(tmp_path, sleeper):
    """Catches "running for 12 s" that measured the time since the last heartbeat (the file's
    ctime moves with every touch), not since the holder started."""
    path = tmp_path / ".lock"
    time.sleep(1.1)
    path.write_text(f"{socket.gethostname()} {sleeper.pid} {locks.process_start(sleeper.pid)}\n")
    _age(path, 0)
    with pytest.raises(locks.LockError, match=r"running for [1-9]\d* s"):
        with locks.exclusive(path, "l2s train", tmp_path):
            pass


def test_an_invert_that_left_images_to_another_process_names_it(tmp_path, monkeypatch,
                                                                 one_thread):
    """Catches an invert that skipped images claimed by a process whose clock runs ahead (so
    its claim is never taken over) without naming it: the images stayed missing in silence."""
    from l2s.cli.invert import summary_lines
    from l2s.engine.loading import load_backbone
    from l2s.inversion.job import InvertConfig, run_invert
    from l2s.inversion.loop import InversionConfig

    den = load_backbone("toy")
    claims = tmp_path / "c" / den.fingerprint / "claims"
    claims.mkdir(parents=True)
    (claims / "img").write_text("elsewhere 123 4567\n")
    ahead = time.time() + 3 * 86400
    os.utime(claims / "img", (ahead, ahead))
    monkeypatch.setattr(AttentionCache, "claim", lambda self, key: False)
    res = run_invert(InvertConfig(cache_dir=str(tmp_path / "c"), limit=1, batch_size=1,
                                  inversion=InversionConfig(method="noise")), den)
    assert res.left_to_others == 2
    assert res.others == ["pid 123 on elsewhere, whose heartbeat is 3 days ahead of this "
                          "folder's clock"]
    assert any("(pid 123 on elsewhere, whose heartbeat is 3 days ahead" in line
               for line in summary_lines(res))
