"""Classifiers on the hub: `l2s classifier push` and `--classifier user/name`.

No network: a folder in tmp_path stands in for the hub. ``push`` goes through huggingface_hub's
``HfApi.create_repo`` / ``upload_folder`` (patched to copy into that folder), and loading goes
through the real ``snapshot_download`` with ``HF_HUB_OFFLINE`` set, reading a HF cache laid out
in tmp_path exactly as huggingface_hub lays it out (``models--user--name/refs/main`` naming a
snapshot folder), the cache a previous online download would have left.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from l2s.classifier import hub as clf_hub
from l2s.classifier.hub import ClassifierHubError, is_repo_id, resolve_classifier
from l2s.classifier.model import PACKAGE_CLASSIFIERS, card_origin, load_classifier, read_card
from l2s.classifier.push import model_card, push_classifier
from l2s.cli import app

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
TOY = PACKAGE_CLASSIFIERS / "toy"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """(remote folder per repo id, HF cache folder): HfApi uploads into the first; ``publish``
    mirrors a remote repo into the second as huggingface_hub's cache layout."""
    import huggingface_hub
    from huggingface_hub import constants

    remote, cache = tmp_path / "remote", tmp_path / "hf-cache"
    calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **kw):
        calls.append(("create_repo", repo_id, private))
        (remote / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, *, folder_path, repo_id, repo_type=None, commit_message=None, **kw):
        calls.append(("upload_folder", repo_id, commit_message))
        shutil.copytree(folder_path, remote / repo_id, dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/{REVISION}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def publish(repo_id: str, extra: dict[str, bytes] | None = None) -> Path:
        user, name = repo_id.split("/")
        repo = cache / f"models--{user}--{name}"
        snap = repo / "snapshots" / REVISION
        shutil.copytree(remote / repo_id, snap)
        for fname, data in (extra or {}).items():
            (snap / fname).write_bytes(data)
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(REVISION)
        return snap

    return remote, cache, calls, publish


def _offline(monkeypatch, on=True):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", on)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if on else "0")


def test_push_then_steer_with_the_repo_id(fake_hub, tmp_path, monkeypatch):
    """Push uploads card, weights, config.json and README.md; `--classifier user/name` then
    loads those exact weights from the HF cache offline and steers. Fails when --classifier
    refuses a repo id (the old behaviour: 'no classifier card at user/name/card.json') or
    push leaves out a file."""
    remote, _, calls, publish = fake_hub
    _offline(monkeypatch, False)
    r = runner.invoke(app, ["classifier", "push", str(TOY), "alice/l2s-toy", "--license", "mit",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["files"] == ["README.md", "card.json", "config.json",
                                             "model.safetensors"]
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    up = remote / "alice/l2s-toy"
    assert (up / "model.safetensors").read_bytes() == (TOY / "model.safetensors").read_bytes()
    config = json.loads((up / "config.json").read_text())
    assert config["architecture"] == read_card(TOY)[1]["architecture"]

    _offline(monkeypatch)
    snap = publish("alice/l2s-toy")
    path, card = read_card("alice/l2s-toy")
    assert path == snap / "card.json" and card["backbone"]["name"] == "toy"
    net, _ = load_classifier("alice/l2s-toy")
    ref, _ = load_classifier(TOY)
    assert all((a == b).all() for a, b in zip(net.state_dict().values(),
                                               ref.state_dict().values(), strict=True))
    assert card_origin(path) == f"from the hub (alice/l2s-toy@{REVISION[:12]})"

    out = tmp_path / "steer"
    r = runner.invoke(app, ["steer", "a circle to the left of a square", "--model", "toy",
                            "--classifier", "alice/l2s-toy", "--steps", "4", "--num-images", "1",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "classifier: alice/l2s-toy (from the hub)" in r.output


def test_bench_records_the_hub_card(fake_hub, monkeypatch):
    """bench's `l2s:CARD` / --classifier go through the same resolution: the card a method
    steers with is the cached snapshot's, pinned by sha256 (fails when bench's card lookup
    reads the repo id as a local path)."""
    from l2s.bench.run import _card

    remote, _, _, publish = fake_hub
    shutil.copytree(TOY, remote / "bob/toy-clf")
    _offline(monkeypatch)
    snap = publish("bob/toy-clf")
    rec = _card("bob/toy-clf")
    assert rec["classifier"] == str(snap / "card.json")
    assert rec["classifier_sha256"] == _card(str(TOY))["classifier_sha256"]


def test_offline_without_the_repo_in_cache_is_one_clear_line(fake_hub, monkeypatch):
    """Offline and not cached: a one-line error naming HF_HUB_OFFLINE, the cache and the
    local-folder alternative, exit 2, no traceback."""
    _offline(monkeypatch)
    with pytest.raises(ClassifierHubError, match="not in the HF cache.*HF_HUB_OFFLINE is set"):
        read_card("carol/missing")
    r = runner.invoke(app, ["steer", "a circle to the left of a square", "--model", "toy",
                            "--classifier", "carol/missing", "--steps", "2"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "no local card or folder of that name" in r.output


def test_a_repo_without_a_card_is_not_a_classifier(fake_hub, monkeypatch):
    remote, _, _, publish = fake_hub
    (remote / "dave/other").mkdir(parents=True)
    (remote / "dave/other/config.json").write_text("{}")
    _offline(monkeypatch)
    publish("dave/other")
    with pytest.raises(ClassifierHubError, match="holds no card.json.*classifier push"):
        read_card("dave/other")


def test_a_local_folder_wins_over_a_repo_id(tmp_path, monkeypatch):
    """`user/name` that exists as a local folder is that folder, never a download (fails when
    every one-slash name is sent to the hub)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(TOY, tmp_path / "runs" / "clf")
    assert not is_repo_id("runs/clf") and is_repo_id("runs/absent")
    assert resolve_classifier("runs/clf") == Path("runs/clf")
    assert not is_repo_id("runs/card.json") and not is_repo_id("./x/y") and not is_repo_id("a")
    called = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: called.append(a))
    assert read_card("runs/clf")[1]["backbone"]["name"] == "toy" and not called


def test_only_safetensors_and_json_are_ever_fetched(monkeypatch, tmp_path):
    """The download asks for JSON, safetensors and the README only: a repo's pickles never
    reach the disk (fails when allow_patterns is dropped or widened to '*')."""
    seen = {}

    def fake_snapshot(repo_id, revision=None, allow_patterns=None, **kw):
        seen["patterns"] = allow_patterns
        shutil.copytree(TOY, tmp_path / "snap", dirs_exist_ok=True)
        return str(tmp_path / "snap")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot)
    assert clf_hub.download_classifier("erin/clf") == tmp_path / "snap"
    pats = seen["patterns"]

    def fetched(name):
        return any(fnmatch.fnmatch(name, p) for p in pats)

    assert fetched("model.safetensors") and fetched("card.json") and fetched("config.json")
    for pickle in ("pytorch_model.bin", "sd2.pth", "model.pt", "x.pkl", "ckpt.ckpt"):
        assert not fetched(pickle), pickle


def _sd_card() -> dict:
    card = json.loads((TOY / "card.json").read_text())
    card["backbone"] = {**card["backbone"], "name": "sd2.1-base", "model": "sd2.1-base",
                        "fingerprint": "feedfacecafe0001"}
    card["leakage"] = {"verdict": "no leakage", "gap": 0.0015}
    return card


def test_model_card_front_matter_and_body():
    """The README follows the hub's model-card format: YAML front matter a hub parser reads
    (library_name, tags, base_model as the preset's repo, license), and a body with the base
    model's fingerprint, the data, metrics, leakage diagnostic and licence."""
    text = model_card(_sd_card(), "alice/l2s-sd2", license="mit")
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "l2s" and "learn-to-steer" in front["tags"]
    assert front["base_model"] == "stabilityai/stable-diffusion-2-1-base"
    assert front["license"] == "mit"
    body = text.split("---\n", 2)[2]
    for want in ("## Base model", "feedfacecafe0001", "## Training data", "`shapes`",
                 "## Metrics", "| test_accuracy | 0.9114 |", "## Leakage diagnostic",
                 "test_accuracy_wrong_caption", '"verdict": "no leakage"', "## Licence",
                 "--classifier alice/l2s-sd2"):
        assert want in body, want
    # the toy has no hub repo: no base_model line rather than a made-up one
    toy = yaml.safe_load(model_card(read_card(TOY)[1], "a/b").split("---\n")[1])
    assert "base_model" not in toy and "license" not in toy


def test_push_refuses_bad_input(fake_hub, tmp_path, monkeypatch):
    """Each mistake is one line naming the fix: a missing folder, a repo id that is not
    user/name, weights that do not match the card, an imported (authors') card without a
    licence, offline."""
    _offline(monkeypatch, False)
    with pytest.raises(ClassifierHubError, match="no such local folder"):
        push_classifier(tmp_path / "nope", "a/b")
    with pytest.raises(ClassifierHubError, match="not a hub repo id"):
        push_classifier(TOY, "just-a-name")
    bad = tmp_path / "bad"
    shutil.copytree(TOY, bad)
    (bad / "model.safetensors").write_bytes((TOY.parent / "toy-mmdit" / "model.safetensors")
                                            .read_bytes())
    with pytest.raises(Exception, match="does not match its weights"):
        push_classifier(bad, "a/b")
    imp = tmp_path / "imp"
    shutil.copytree(TOY, imp)
    card = json.loads((imp / "card.json").read_text())
    card["source"], card["licence"] = {"file": "sd2.pth"}, "non-commercial"
    (imp / "card.json").write_text(json.dumps(card))
    with pytest.raises(ClassifierHubError, match="does not republish"):
        push_classifier(imp, "a/b")
    _offline(monkeypatch)
    with pytest.raises(ClassifierHubError, match="HF_HUB_OFFLINE"):
        push_classifier(TOY, "a/b")
    r = runner.invoke(app, ["classifier", "push", str(tmp_path / "nope"), "a/b"])
    assert r.exit_code == 2 and "Traceback" not in r.output
