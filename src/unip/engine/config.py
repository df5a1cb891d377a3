"""Run configurations: nested dicts of defaults, overlaid by a YAML preset and ``--set key=value`` overrides.

Keys are dotted paths into the nesting (``optim.blr``); values in overrides are parsed as YAML scalars
(``1e-4`` → float, ``true`` → bool, ``[0.9, 0.95]`` → list, ``null`` → None). A key that the defaults do
not define, or a value of the wrong kind, is a ``ConfigError`` that names the key and where it came from.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import yaml

from unip.errors import ConfigError

Config = Dict[str, Any]

#: Where preset names are looked up: the presets shipped in the package (``unip/configs``), then
#: ``configs/`` of the working directory (your own presets).
PRESET_ROOTS: List[Path] = [Path(__file__).resolve().parents[1] / "configs", Path("configs")]


def find_preset(name: str, kind: str) -> Path:
    """A YAML file path, or a preset name looked up as ``configs/<kind>/<name>.yaml``."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        return path
    for root in PRESET_ROOTS:
        candidate = root / kind / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    available = sorted({p.stem for root in PRESET_ROOTS for p in (root / kind).glob("*.yaml")})
    raise ConfigError(f"unknown {kind} preset {name!r}; choose one of: {', '.join(available) or '(none found)'}"
                      " or pass a YAML file")


def read_yaml(path: Union[str, Path]) -> Config:
    try:
        with open(path, "r", encoding="utf-8") as handle:
            content = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read YAML ({err})") from err
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, not {type(content).__name__}")
    return content


def parse_override(text: str) -> tuple:
    """``"optim.blr=1e-4"`` → ``("optim.blr", 1e-4)`` with the value parsed as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set optim.blr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: cannot parse the value ({err})") from err
    return key.strip(), value


def _coerce(key: str, value: Any, default: Any, origin: str) -> Any:
    """Check ``value`` against the kind of ``default``; ints become floats where a float is expected."""
    def bad(kind: str) -> ConfigError:
        return ConfigError(f"{origin}: {key} must be {kind}, got {value!r}")

    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, (int, float)):
        value = _number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if isinstance(default, float):
            return float(value)
        return value
    if isinstance(default, list) and not isinstance(value, list):
        raise bad("a list")
    return value


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; where a number is expected it becomes a float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def set_key(config: Config, key: str, value: Any, origin: str) -> None:
    """Set the dotted ``key`` in ``config`` in place; it must already exist (a known setting)."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(f"{origin}: unknown setting {key!r} ({where} has: {known})")
        if depth == len(parts) - 1:
            if isinstance(node[part], dict):
                if not isinstance(value, dict):
                    raise ConfigError(f"{origin}: {key} is a section; set its keys, e.g. {key}.<name>=...")
                for sub, sub_value in value.items():
                    set_key(config, f"{key}.{sub}", sub_value, origin)
            else:
                node[part] = _coerce(key, value, node[part], origin)
        else:
            node = node[part]


def flatten(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def build_config(defaults: Config, preset: Optional[Union[str, Path]] = None, overrides: Iterable[str] = (),
                 kind: str = "pretrain", values: Optional[Mapping[str, Any]] = None) -> Config:
    """``defaults`` ← preset file (name or path) ← ``values`` (dotted keys, from code) ← ``overrides``
    (``key=value`` strings). Returns a new nested dict; the defaults are not modified."""
    config = copy.deepcopy(defaults)
    if preset:
        path = find_preset(str(preset), kind)
        for key, value in flatten(read_yaml(path)).items():
            set_key(config, key, value, str(path))
    for key, value in (values or {}).items():
        set_key(config, key, value, "config")
    for text in overrides:
        key, value = parse_override(text)
        set_key(config, key, value, f"--set {text}")
    return config


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config, sort_keys=False)


__all__: Sequence[str] = ["build_config", "dump_config", "find_preset", "flatten", "parse_override",
                          "read_yaml", "set_key"]
