"""Run configurations: nested dicts of defaults, overlaid by a YAML preset and ``--set key=value`` overrides.

Keys are dotted paths into the nesting (``optim.blr``); values in overrides are parsed as YAML scalars
(``1e-4`` → float, ``true`` → bool, ``[0.9, 0.95]`` → list, ``null`` → None). A key that the defaults do
not define, or a value of the wrong kind, is a ``ConfigError`` that names the key and where it came from.

A schema (``{dotted key: Rule}``, declared next to the defaults, e.g. ``unip.distill.train.RULES``) says
what each setting may hold: its type, its range, whether ``null`` is allowed, its choices. ``build_config``
checks every setting against it after the last override, so nothing runs on a value out of range.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

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
        if path.is_dir():
            raise ConfigError(f"{name}: is a folder, not a config file; pass a YAML file or a preset name "
                              f"({', '.join(list_presets(kind)) or 'none found'})")
        if not path.is_file():
            raise ConfigError(f"{path}: config file does not exist")
        return path
    for root in PRESET_ROOTS:
        candidate = root / kind / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    available = list_presets(kind)
    raise ConfigError(f"unknown {kind} preset {name!r}; choose one of: {', '.join(available) or '(none found)'}"
                      " or pass a YAML file")


def list_presets(kind: str) -> List[str]:
    """The preset names of ``kind`` (``pretrain``, ``finetune``, ...): ``configs/<kind>/*.yaml`` of every
    ``PRESET_ROOTS`` entry, sorted; bases that only others build on (``_soda.yaml``) are left out."""
    return sorted({path.stem for root in PRESET_ROOTS for path in (root / kind).glob("*.yaml")
                   if not path.stem.startswith("_")})


# ============================================================================================ presets
#: The key of a preset that names the presets it builds on (as mmsegmentation's ``_base_``): one name or a list,
#: applied in order, then the preset's own settings over them. A name is a preset beside it or of the same kind
#: (``_soda``), ``KIND/NAME`` a preset of another kind (``finetune/soda_small``), or a YAML file relative to it.
BASE_KEY = "_base_"
#: How deep bases may build on bases (a guard against a chain that never ends).
MAX_BASE_DEPTH = 16


def read_preset(preset: Union[str, Path], kind: str) -> Dict[str, Tuple[Any, str]]:
    """The settings a preset (name or file) states, its bases resolved: ``{dotted key: (value, origin)}``, origin
    being the file that set the value last (``preset_label``). ``ConfigError`` naming the file for a base that
    cannot be found, a circle of bases, or a ``_base_`` that is not a name or a list of names."""
    return _resolve_preset(find_preset(str(preset), kind), kind, ())


def _resolve_preset(path: Path, kind: str, chain: Tuple[Path, ...]) -> Dict[str, Tuple[Any, str]]:
    here = path.resolve()
    if here in chain:
        circle = " → ".join(preset_label(p) for p in (*chain[chain.index(here):], here))
        raise ConfigError(f"{path}: its {BASE_KEY} presets go round in a circle ({circle}); remove one")
    if len(chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: more than {MAX_BASE_DEPTH} levels of {BASE_KEY} presets; flatten the chain")
    document = dict(read_yaml(path))
    bases = document.pop(BASE_KEY, [])
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not all(isinstance(name, str) and name.strip() for name in names):
        raise ConfigError(f"{path}: {BASE_KEY} must be a preset name or YAML file, or a list of them; "
                          f"got {bases!r}")
    settings: Dict[str, Tuple[Any, str]] = {}
    for name in names:
        settings.update(_resolve_preset(_base_path(name, path, kind), kind, (*chain, here)))
    origin = preset_label(path)
    settings.update({key: (value, origin) for key, value in flatten(document).items()})
    return settings


def _base_path(name: str, child: Path, kind: str) -> Path:
    """Where the base ``name`` of the preset file ``child`` is (``BASE_KEY``): a YAML file relative to ``child``,
    ``KIND/NAME``, or a bare name: the file ``NAME.yaml`` beside ``child``, else a preset of ``kind``."""
    if Path(name).suffix in (".yaml", ".yml"):
        path = child.parent / name
        if not path.is_file():
            raise ConfigError(f"{child}: {BASE_KEY} {name!r} does not exist ({path})")
        return path
    base_kind, _, base_name = name.rpartition("/")
    if not base_kind and (child.parent / f"{name}.yaml").is_file():
        return child.parent / f"{name}.yaml"
    try:
        return find_preset(base_name, base_kind or kind)
    except ConfigError as err:
        raise ConfigError(f"{child}: {BASE_KEY}: {err}") from None


def preset_label(path: Path) -> str:
    """How a preset file is named in messages and ``--print-config``: ``configs/<kind>/<file>`` for the presets
    of ``PRESET_ROOTS`` (the package's and ``./configs``), the path as given for any other file."""
    resolved = path.resolve()
    for root in PRESET_ROOTS:
        try:
            return str(Path("configs") / resolved.relative_to(root.resolve()))
        except ValueError:
            continue
    return str(path)


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML document gives the same key twice (plain YAML would keep the last one silently)."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"key {key!r} is given twice in one mapping (lines {first_line} and {line}); keep one")


class UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """``yaml.SafeLoader`` that raises ``DuplicateKeyError`` for a key given twice in one mapping; on libyaml's parser
    where PyYAML has it (a sweep file's 20,000-entry seed list reads in a tenth of the time)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        seen: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<: *defaults``: keys given next to a merge override it, as YAML means them to
            key, line = self.construct_object(key_node, deep=deep), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
        return super().construct_mapping(node, deep=deep)


def load_yaml(stream: Any) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (``DuplicateKeyError``, a ``yaml.YAMLError``): what every
    YAML file unip reads (presets, run configs, sweep files, a folder data set's ``classes.yaml``) goes through."""
    return yaml.load(stream, Loader=UniqueKeyLoader)


def read_yaml(path: Union[str, Path]) -> Config:
    """The mapping of a YAML config file. ``ConfigError`` naming the file when it cannot be read, is not a
    mapping, or gives a key twice."""
    try:
        with open(path, "r", encoding="utf-8") as handle:
            content = load_yaml(handle) or {}
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from err
    except (OSError, UnicodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read YAML ({_first_line(err)})") from err
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, not {type(content).__name__}")
    return content


def parse_override(text: str) -> tuple:
    """``"optim.blr=1e-4"`` → ``("optim.blr", 1e-4)`` with the value parsed as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        example = key.strip() if sep == "" and "." in key else "run.seed"  # a setting every verb has
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set {example}=VALUE")
    if not raw.strip():
        raise ConfigError(f"--set {text!r}: no value after '='; give one (key=null clears a setting that "
                          "may be empty)")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: cannot parse the value ({_first_line(err)})") from err
    return key.strip(), value


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


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


def set_key(config: Config, key: str, value: Any, origin: str,
            origins: Optional[Dict[str, str]] = None, kinds: Optional[Config] = None) -> None:
    """Set the dotted ``key`` in ``config`` in place; it must already exist (a known setting). ``origins``,
    when given, records ``origin`` for every key set. The value must be of the kind of the key's value in
    ``kinds`` (the defaults; default: ``config`` itself), not of what a preset put there (``teacher.layer: 18``
    in a preset must not stop ``--teacher-layer auto``)."""
    parts = key.split(".")
    node = config
    reference = kinds if kinds is not None else config
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
                    set_key(config, f"{key}.{sub}", sub_value, origin, origins, kinds)
            else:
                kind = reference.get(part, node[part]) if isinstance(reference, dict) else node[part]
                node[part] = _coerce(key, value, kind, origin)
                if origins is not None:
                    origins[key] = origin
        else:
            node = node[part]
            reference = reference.get(part) if isinstance(reference, dict) else None


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
                 kind: str = "pretrain", values: Optional[Mapping[str, Any]] = None,
                 rules: Optional[Mapping[str, "Rule"]] = None,
                 origins: Optional[Mapping[str, str]] = None,
                 sources: Optional[Dict[str, str]] = None) -> Config:
    """``defaults`` ← preset (name or file, with its ``_base_`` presets: ``read_preset``) ← ``values`` (dotted
    keys, from code) ← ``overrides`` (``key=value`` strings), then checked against ``rules`` (see
    ``check_config``). ``origins`` names where each of ``values`` came from in error messages (e.g.
    ``{"optim.epochs": "--epochs"}``); ``sources``, when given, is filled with where every setting that is not
    a default came from (``dump_config`` shows it). Returns a new nested dict; the defaults are not modified."""
    config = copy.deepcopy(defaults)
    where: Dict[str, str] = {} if sources is None else sources
    if preset:
        for key, (value, origin) in read_preset(preset, kind).items():
            set_key(config, key, value, origin, where, defaults)
    for key, value in (values or {}).items():
        set_key(config, key, value, (origins or {}).get(key, "config"), where, defaults)
    for text in overrides:
        key, value = parse_override(text)
        set_key(config, key, value, f"--set {text}", where, defaults)
    if rules is not None:
        _numbers_from_text(config, rules)
        check_config(config, defaults, rules, where)
    return config


def _numbers_from_text(config: Config, rules: Mapping[str, "Rule"]) -> None:
    """YAML 1.1 reads ``1e4`` as text; where a rule asks for a number (and the default, being null, could not
    say so) such a text becomes the number it spells."""
    for key, rule in rules.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        value = node.get(last) if isinstance(node, dict) else None
        if rule.kind in ("int", "number") and isinstance(value, str) and value not in rule.words:
            number = _number(value)
            if isinstance(number, float) and rule.kind == "int" and number.is_integer():
                number = int(number)
            node[last] = number


# ============================================================================================ schema
@dataclass(frozen=True)
class Rule:
    """What one setting (or command-line option) may hold.

    ``kind``: ``int``, ``number``, ``bool``, ``text`` or ``numbers`` (a list of ``length`` numbers).
    ``gt``/``ge``/``lt``/``le`` bound numbers and every item of a list; ``null`` allows None; ``words`` are
    texts accepted besides a number (e.g. ``auto``); ``choices`` are the texts a ``text`` may be;
    ``ascending`` asks list items not to decrease; ``table``: a mapping whose keys (read when a value is checked,
    so that an entry added later counts) are choices too. Build rules with ``integer``, ``number``, ``numbers``,
    ``text``, ``one_of`` and ``flag``."""

    kind: str
    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None
    null: bool = False
    words: Tuple[str, ...] = ()
    choices: Tuple[str, ...] = ()
    length: Optional[int] = None
    ascending: bool = False
    table: Optional[Mapping[str, Any]] = field(default=None, compare=False)

    @property
    def options(self) -> Tuple[str, ...]:
        """The texts a ``text`` rule may be (``choices``, then the keys of ``table``); empty: any text."""
        return self.choices + tuple(self.table or ())

    def describe(self) -> str:
        """What the rule accepts, in words (``"an integer >= 1"``, ``"null or a number > 0 and <= 1"``)."""
        kinds = {"int": "an integer", "number": "a number", "bool": "true or false", "text": "a text",
                 "numbers": f"a list of {self.length} numbers"}
        what = kinds[self.kind]
        if self.options:
            what = f"one of: {', '.join(self.options)}"
        bounds = [f"{sign} {_plain_number(limit)}" for sign, limit in
                  ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le)) if limit is not None]
        if bounds:
            what += (", each " if self.kind == "numbers" else " ") + " and ".join(bounds)
        if self.ascending:
            what += ", not decreasing"
        alternatives = (["null"] if self.null else []) + [repr(word) for word in self.words]
        return " or ".join(alternatives + [what])

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null
        if isinstance(value, str) and value in self.words:
            return True
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "text":
            options = self.options
            return isinstance(value, str) and bool(value) and (not options or value in options)
        if self.kind == "numbers":
            if not isinstance(value, (list, tuple)) or len(value) != self.length:
                return False
            if not all(self._number_ok(item) for item in value):
                return False
            return not self.ascending or all(a <= b for a, b in zip(value, value[1:]))
        if self.kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
            return False
        return self._number_ok(value)

    def _number_ok(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def check(self, value: Any, name: str) -> Any:
        """``value`` when the rule accepts it; else ``ConfigError("NAME must be ..., got VALUE")``."""
        if not self.accepts(value):
            raise ConfigError(f"{name} must be {self.describe()}, got {_shown(value)}")
        return value

    def option(self, parse: Callable[[str], Any] = int) -> Callable[[str], Any]:
        """An argparse ``type=`` that parses the text with ``parse`` and applies the rule: a bad value is an
        argparse error ("argument --x: must be an integer >= 1, got -1")."""
        def convert(text: str) -> Any:
            try:
                value = parse(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
            if not self.accepts(value):
                raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text}")
            return value
        return convert


def _plain_number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _shown(value: Any) -> str:
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def integer(ge: Optional[int] = None, le: Optional[int] = None, *, null: bool = False,
            words: Tuple[str, ...] = ()) -> Rule:
    """An integer in ``[ge, le]`` (either bound optional)."""
    return Rule("int", ge=ge, le=le, null=null, words=words)


def number(*, gt: Optional[float] = None, ge: Optional[float] = None, lt: Optional[float] = None,
           le: Optional[float] = None, null: bool = False) -> Rule:
    """A finite number (int or float) within the given bounds."""
    return Rule("number", gt=gt, ge=ge, lt=lt, le=le, null=null)


def numbers(length: int, *, gt: Optional[float] = None, ge: Optional[float] = None, lt: Optional[float] = None,
            le: Optional[float] = None, ascending: bool = False) -> Rule:
    """A list of ``length`` finite numbers, each within the bounds."""
    return Rule("numbers", gt=gt, ge=ge, lt=lt, le=le, length=length, ascending=ascending)


def text(*choices: str, null: bool = False) -> Rule:
    """A non-empty text, one of ``choices`` when given."""
    return Rule("text", choices=tuple(choices), null=null)


def one_of(table: Mapping[str, Any], *choices: str, null: bool = False) -> Rule:
    """A text that is a key of ``table`` (an extension point's table: read when checked) or one of ``choices``."""
    return Rule("text", choices=tuple(choices), null=null, table=table)


def flag() -> Rule:
    return Rule("bool")


def check_config(config: Config, defaults: Config, rules: Mapping[str, Rule],
                 origins: Optional[Mapping[str, str]] = None) -> None:
    """Check every setting of ``config`` against its rule; a setting without a rule may be null only
    where its default is. Raises ``ConfigError`` naming the key, the value, where it was set and what
    is allowed."""
    default_values = flatten(defaults)
    for key, value in flatten(config).items():
        rule = rules.get(key)
        origin = (origins or {}).get(key, "defaults")
        if rule is None:
            if value is None and default_values.get(key) is not None:
                raise ConfigError(f"{origin}: {key} must not be null (default {default_values[key]!r})")
        elif not rule.accepts(value):
            raise ConfigError(f"{origin}: {key} must be {rule.describe()}, got {_shown(value)}")


def dump_config(config: Config, sources: Optional[Mapping[str, str]] = None,
                defaults: Optional[Config] = None) -> str:
    """``config`` as YAML. With ``sources`` (``build_config``'s), every setting is followed by a comment saying
    where its value came from: a preset file, an option, ``--set``, ``default`` (``defaults``' value) or
    ``derived`` (filled in from other settings); the text still reads back as the same config."""
    if sources is None:
        return yaml.safe_dump(config, sort_keys=False)
    default_values = flatten(defaults or {})
    lines: List[Tuple[str, str]] = []

    def walk(section: Mapping[str, Any], prefix: str, indent: str) -> None:
        for key, value in section.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                lines.append((f"{indent}{key}:", ""))
                walk(value, name + ".", indent + "  ")
                continue
            shown = yaml.safe_dump({key: value}, default_flow_style=True, width=10**9, sort_keys=False)
            origin = sources.get(name) or ("default" if default_values.get(name, value) == value else "derived")
            lines.append((f"{indent}{shown.strip()[1:-1]}", origin))

    walk(config, "", "")
    column = min(max(len(text) for text, origin in lines if origin) + 2, 64)
    return "".join(f"{text.ljust(column)}# {origin}\n" if origin else f"{text}\n" for text, origin in lines)


__all__: Sequence[str] = ["BASE_KEY", "DuplicateKeyError", "Rule", "UniqueKeyLoader", "build_config", "check_config",
                          "dump_config", "find_preset", "flag", "flatten", "integer", "list_presets", "load_yaml",
                          "number", "numbers", "one_of", "parse_override", "preset_label", "read_preset", "read_yaml",
                          "set_key", "text"]
