"""Where a model's files are: a local folder or the HF cache (nothing is downloaded here unless
asked), whether the hub can be reached, and the JSON files (``model_index.json``, component
configs) a family reads before loading anything."""

from __future__ import annotations

import json
from pathlib import Path


def hf_cache_dir() -> Path:
    """Where huggingface_hub looks for downloaded models (honours HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def cached_file(repo: str, filename: str) -> str | None:
    """A file of a hub repo in the local HF cache, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo, filename)
    except Exception:  # not a valid repo id
        return None
    return hit if isinstance(hit, str) else None


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub id (org/name), not a path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def hub_file(name: str, filename: str, fetch: bool = False) -> Path | None:
    """`filename` of a local folder or of a hub repo already in the HF cache, else None;
    ``fetch``: download it from the hub when it is not cached and the hub can be reached."""
    local = Path(name).expanduser()
    path = local / filename if local.is_dir() else cached_file(name, filename)
    if path is None and fetch and not local.exists() and is_hub_id(name) and not hf_offline() \
            and hub_reachable():
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(name, filename)
        except Exception:  # absent, gated, network: the loader's own error says more
            path = None
    return Path(path) if path is not None and Path(path).is_file() else None


def config_json(source: str, filename: str, fetch: bool = False) -> dict | None:
    """A JSON file (``model_index.json``, ``transformer/config.json``) of a folder or of a hub
    repo in the HF cache (``fetch``: or from the hub), or None when absent or unreadable."""
    path = hub_file(source, filename, fetch)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pipeline_class(source: str, fetch: bool = False) -> str | None:
    """The diffusers pipeline class a folder or hub repo declares (``model_index.json``
    ``_class_name``), if any; ``fetch``: read a hub repo's from the hub when not cached."""
    name = (config_json(source, "model_index.json", fetch) or {}).get("_class_name")
    return name if isinstance(name, str) else None
