"""Shards of a job across processes: the one parser of ``--shard I/N``, and the shard a
multi-process launcher (`accelerate launch`, torchrun) gives each process (RANK, WORLD_SIZE).

Each such process's GPU (LOCAL_RANK) is chosen where every device is: ``l2s.engine.loading.
resolve_device``."""

from __future__ import annotations

import os

from l2s.config import ConfigError, is_whole


def parse_shard(text: str | None, option: str = "--shard") -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None or "" -> None (no explicit shard)."""
    if text is None or text == "":
        return None
    parts = str(text).split("/")
    try:
        i, n = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{option} {text!r}: write it as I/N with 0 <= I < N, e.g. 0/4"
                          ) from None
    check_shard((i, n), option)
    return i, n


def check_shard(shard: tuple[int, int] | None, option: str = "--shard") -> None:
    """Refuse a shard that is not two integers (i, n) with 0 <= i < n: one that takes nothing
    (3 of 2) would finish with no work done and no word."""
    if shard is None:
        return
    if (not isinstance(shard, tuple | list) or len(shard) != 2
            or not all(is_whole(v) for v in shard)):
        raise ConfigError(f"{option} must be two integers (i, n), got {shard!r}")
    i, n = shard
    if not 0 <= i < n:
        raise ConfigError(f"{option} {i}/{n}: use I/N with 0 <= I < N (N processes, this one "
                          "the I-th, counting from 0)")


def format_shard(shard: tuple[int, int] | None) -> str | None:
    """(i, n) -> "i/n", as ``--shard`` takes it."""
    return None if shard is None else f"{shard[0]}/{shard[1]}"


def launcher_shard() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) when a launcher started several processes, else None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ConfigError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE="
                          f"{os.environ.get('WORLD_SIZE')!r} are not integers: start the "
                          "processes with accelerate launch or torchrun, or pass --shard I/N"
                          ) from None
    if world <= 1:
        return None
    check_shard((rank, world), "RANK/WORLD_SIZE")
    return rank, world


def resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    """The explicit shard, else the launcher's, else None (the whole job)."""
    if shard is not None:
        check_shard(shard)
        return tuple(shard)
    return launcher_shard()
