"""Classifiers on the Hugging Face hub: where ``--classifier NAME`` points.

``NAME`` is a local card (``card.json``) or the folder holding one when that path exists;
otherwise a name that reads as a hub repo id (``user/name``, one slash, not ending in
``.json``) is a classifier repo on the hub. It is fetched with ``snapshot_download`` into the
HF cache (``HF_HOME`` / ``HF_HUB_CACHE``), honouring ``HF_HUB_OFFLINE``: offline, or with the
hub out of reach, the cached snapshot is used. Only JSON, safetensors and the README are ever
fetched (``HUB_PATTERNS``): a repo's pickles (``*.bin``, ``*.pth``, ``*.pt``) are never
downloaded, let alone loaded.

A classifier repo is the folder `l2s train` writes (``card.json`` + ``model.safetensors``)
plus the hub's own files, which `l2s classifier push` adds: ``config.json`` (the network's
architecture, as ``PyTorchModelHubMixin`` models keep their init arguments) and a
``README.md`` model card.
"""

from __future__ import annotations

import re
from pathlib import Path

from l2s.engine.hub import hf_cache_dir, hf_offline, is_hub_id
from l2s.errors import L2SError

CARD_NAME = "card.json"  # as l2s.classifier.model.CARD_FILE (that module imports this one)
HUB_PATTERNS = ["*.json", "*.safetensors", "README.md"]  # never *.bin / *.pth / *.pt / *.pkl


class ClassifierHubError(L2SError, RuntimeError):
    """A classifier repo cannot be fetched from the hub or the HF cache."""


def is_repo_id(name: str | Path) -> bool:
    """Whether ``name`` names a hub repo rather than a local card: it reads as ``user/name``
    and no such local path exists (a local folder always wins)."""
    text = str(name)
    if Path(text).expanduser().exists():
        return False
    return is_hub_id(text) and not text.endswith(".json") and bool(
        re.fullmatch(r"[\w.-]+/[\w.-]+", text))


def resolve_classifier(name: str | Path) -> Path:
    """The local path of the card ``name`` names: ``name`` itself when it is a local path (or
    reads as none), else the snapshot folder of hub repo ``name`` in the HF cache, fetched
    when missing (offline: the cached one, else a one-line error)."""
    if not is_repo_id(name):
        return Path(name).expanduser()
    return download_classifier(str(name))


def download_classifier(repo_id: str, revision: str | None = None) -> Path:
    """Snapshot folder of classifier repo ``repo_id`` in the HF cache (safetensors and JSON
    only); raises ClassifierHubError naming the fix when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"--classifier {repo_id}: no local card or folder of that name, and the hub repo"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if hf_offline() else "the hub cannot be reached"
        raise ClassifierHubError(
            f"{where} {repo_id} is not in the HF cache ({hf_cache_dir()}) and {why}: fetch it "
            "once online (unset HF_HUB_OFFLINE), or pass the path of a local classifier "
            "folder (./NAME for a relative one)") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise ClassifierHubError(
            f"{where} {repo_id} cannot be read ({type(e).__name__}: it does not exist, or it "
            "is private or gated: `hf auth login` with a token that may read it); for a local "
            "folder pass an existing path") from None
    except (HfHubHTTPError, OSError) as e:
        raise ClassifierHubError(f"{where} {repo_id} could not be fetched ({e}): retry, or "
                                 "pass a local classifier folder") from None
    if not (folder / CARD_NAME).is_file():
        raise ClassifierHubError(
            f"hub repo {repo_id} holds no {CARD_NAME}: it is not an l2s classifier (publish "
            "one with `l2s classifier push DIR REPO_ID`; a published .pth goes through "
            "`l2s classifier import`)")
    return folder


_SNAPSHOT = re.compile(r"models--(?P<user>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]+)")


def hub_origin(card_path: str | Path) -> str | None:
    """``user/name@revision`` for a card inside the HF cache's snapshot of a hub repo (where
    ``--classifier user/name`` puts it), else None."""
    m = _SNAPSHOT.search(Path(card_path).as_posix())
    return f"{m['user']}/{m['name']}@{m['rev'][:12]}" if m else None
