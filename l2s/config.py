"""Run configs: checking option values, reading them from YAML, writing the resolved YAML.

Every check names the option as the command line spells it (``--steps``), so the same message
serves the CLI, a ``--config`` file and the Python API.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from l2s.errors import ConfigError, one_line

CONFIG_FILE = "config.yaml"  # the resolved config every run writes beside its outputs
# The largest noise seed: torch's CPU generator keeps 32 bits of a seed, so 2**32 would draw
# seed 0's noise again.
MAX_SEED = 2**32 - 1


def check_number(name: str, value: float | None, low: float, *, strict: bool = False) -> None:
    """``value`` is None, or a finite number >= ``low`` (> ``low`` when ``strict``)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if value < low or (strict and value == low):
        raise ConfigError(f"{name} must be {'>' if strict else '>='} {low:g}, got {value:g}")


def is_whole(value) -> bool:
    """An int that is not a bool (a YAML ``true`` is no count): what every whole-number option
    and card field must be."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_integer(name: str, value, low: int | None = None,
                  error: type[Exception] = ConfigError, *, optional: bool = True,
                  high: int | None = None) -> None:
    """``value`` is a whole number (an int: not a bool, not a float) in [``low``, ``high``], or
    None when ``optional`` (``error``: the caller's own exception type)."""
    if value is None and optional:
        return
    if not is_whole(value):
        raise error(f"{name} must be a whole number, got {value!r}")
    if low is not None and value < low:
        raise error(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise error(f"{name} must be <= {high}, got {value}")


def check_text(name: str, value, *, optional: bool = False, path: bool = False,
               error: type[Exception] = ConfigError) -> None:
    """``value`` is a non-empty string (or None when ``optional``; or a path when ``path``)."""
    if (value is None and optional) or (path and isinstance(value, os.PathLike)):
        return
    if not isinstance(value, str) or not value.strip():
        raise error(f"{name} must be a non-empty text, got {value!r}")


def check_seeds(name: str, seed: int, count: int = 1, *, last: int | None = None) -> None:
    """``seed`` is a whole number >= 0 and the last seed a run derives from it (``last``,
    default ``seed + count - 1``) at most MAX_SEED, so no two images share their noise."""
    if seed is None:
        raise ConfigError(f"{name} must be a whole number, got None")
    check_integer(name, seed, 0)
    if count > 1 and last is None and count - 1 > MAX_SEED:  # the count is what is too large
        raise ConfigError(f"--num-images {count} gives that many image seeds, past "
                          f"{MAX_SEED + 1} (2^32), where the noise generator's seeds wrap "
                          "around: pass fewer --num-images")
    last = seed + count - 1 if last is None else last
    if last > MAX_SEED:
        raise ConfigError(f"{name} {seed} gives image seeds up to {last}, past {MAX_SEED} (2^32 "
                          f"- 1), where the noise generator's seeds wrap around: pass a smaller "
                          f"{name}")


def check_flag(name: str, value) -> None:
    """``value`` is True or False: from Python, ``verify="no"`` is a true string (it turned
    verification on) and ``1`` no flag."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def check_config(job: str, config, cls: type) -> None:
    """A job is called with its own config: ``steer({"prompt": ...})`` or ``steer(None)`` was an
    AttributeError from deep inside."""
    if not isinstance(config, cls):
        raise ConfigError(f"{job}() takes a {cls.__name__}, got {type(config).__name__}: build "
                          f"one, e.g. {job}({cls.__name__}(...)) (help({cls.__name__}) lists "
                          "its fields)")


def check_choice(name: str, value: str, choices, error: type[Exception] = ConfigError) -> None:
    """Refuse a value outside ``choices``, naming the option (``error``: the caller's own
    exception type, e.g. a job's)."""
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def expand_home(config, *names: str) -> None:
    """Give the path fields ``names`` of ``config`` (a frozen dataclass) a leading ``~`` as
    the home folder, as the checks read it: a quoted "~/x" (or ``--out=~/x``, which no shell
    expands) was checked as $HOME/x and written to a folder named "~" in the working folder."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, str) and value.startswith("~"):
            object.__setattr__(config, name, os.path.expanduser(value))


def check_writable_dir(path: str | Path, option: str = "--out", *,
                       given: str | Path | None = None) -> None:
    """Fail before any work if ``path`` (or the folder it would be made in) cannot be written.
    Messages quote ``given`` (default ``path``): the value the user passed to ``option``."""
    try:
        _check_writable_dir(path, option, given)
    except OSError as e:  # a name too long, a loop of links: found while looking, not writing
        shown = path if given is None else given
        raise ConfigError(f"{option} {shown} cannot be used ({e.strerror or e}): pass another "
                          f"{option}") from None


def _check_writable_dir(path, option, given) -> None:
    p = Path(path).expanduser()
    path = path if given is None else given
    dangling = next((a for a in (p, *p.parents) if a.is_symlink() and not a.exists()), None)
    if dangling is not None:  # mkdir would fail with FileExistsError after the work is done
        raise ConfigError(f"{option} {path}: {dangling} is a symbolic link to "
                          f"{os.readlink(dangling)}, which does not exist: create its target "
                          f"or pass another {option}")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{option} {path}: {probe} is a file, not a folder: pass another "
                          f"{option}")
    try:  # a real write: os.access says yes to root even on a read-only mount
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"{option} {path} cannot be written ({probe}: {e.strerror}): pass a "
                          f"writable {option}") from None


def check_writable_file(path: str | Path, option: str = "--out") -> None:
    """Fail before any work if the file ``path`` cannot be written (its folder made)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{option} {path} is a folder: give a file name, e.g. "
                          f"{p / 'report.json'}")
    check_writable_dir(p.parent, option, given=path)


# A config is a short mapping of options: a file larger than this, or whose aliases expand to
# more nodes than this, is refused rather than read (`/dev/zero`, a "billion laughs" file of
# nested aliases: safe_load is safe from code, not from size).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000


def _expanded_nodes(node, seen: dict) -> int:
    """Nodes of a composed YAML document with every alias expanded, counted without expanding
    them (shared nodes are counted once per use, from a memo)."""
    import yaml

    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = MAX_CONFIG_NODES + 1  # a node that contains itself never ends
    children = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    total = 1
    for child in children:
        total += _expanded_nodes(child, seen)
        if total > MAX_CONFIG_NODES:
            break
    seen[id(node)] = total
    return total


def _check_unique_keys(node, path) -> None:
    """Refuse an option given twice in a config file: yaml.safe_load keeps the last silently,
    so `steps: 50` above a forgotten `steps: 5` would run 5 steps without a word."""
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        name = str(key.value).replace("-", "_")
        if name in seen:
            raise ConfigError(f"config file {path} gives {key.value} twice (lines "
                              f"{seen[name] + 1} and {key.start_mark.line + 1}): keep one")
        seen[name] = key.start_mark.line


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file (``yaml.safe_load``); keys with dashes read as
    underscores, so ``num-images`` and ``num_images`` are the same option."""
    import yaml

    p = Path(path).expanduser()
    try:
        if p.exists() and not p.is_dir() and not p.is_file():
            raise ConfigError(f"config file {path} is not a regular file (a device, FIFO or "
                              "socket): pass a .yaml file")
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: "
                              "a config holds a few options; pass the .yaml file l2s wrote")
        text = raw.decode("utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_unique_keys(node, path)
        if node is not None and _expanded_nodes(node, {}) > MAX_CONFIG_NODES:
            raise ConfigError(f"config file {path} expands to more than {MAX_CONFIG_NODES} "
                              "values through its aliases (&anchor / *alias): write the "
                              "options out plainly")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder: pass the .yaml file") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}): pass a readable "
                          ".yaml file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text: pass a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: "
                          f"{one_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got "
                          f"{type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def dump_yaml(values: Mapping, path: str | Path) -> Path:
    """Write ``values`` as YAML (atomically) so that ``--config path`` repeats the run."""
    import yaml

    from l2s.inversion.cache import atomic_write_text

    p = Path(path)
    text = yaml.safe_dump(_plain(values), sort_keys=False, allow_unicode=True)
    atomic_write_text(p, text)
    return p


def option_values(config, renames: Mapping[str, str] | None = None) -> dict:
    """A job config as its command's option values, what its config.yaml holds: every field,
    a nested options dataclass (``SteerOptions``) flattened into its fields, keys renamed where
    the command spells a field otherwise (``renames``: field -> option name)."""
    from dataclasses import fields, is_dataclass

    renames = renames or {}
    values: dict = {}
    for f in fields(config):
        v = getattr(config, f.name)
        if is_dataclass(v) and not isinstance(v, type):
            values.update({g.name: getattr(v, g.name) for g in fields(v)})
        else:
            values[renames.get(f.name, f.name)] = v
    return _plain(values)


def _plain(v):
    """Tuples as lists, paths as strings: what safe_dump writes and safe_load reads back."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v
