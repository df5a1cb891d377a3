"""The sweep file (``configs/sweeps/*.yaml``, docs/sweep.md): backbones × data sets × protocols × seeds.

A sweep file is YAML::

    name: paper                       # shown in the report
    vars: {weights: null, data: null} # ${weights} in any text value; --var weights=DIR sets it (null: required)
    preset: "{dataset}_{size}"        # the unip finetune preset of every cell ({dataset}: the data set's
                                      # preset stem, {size}: the backbone's size); "toy" for the tiny sweep
    set: {run.eval_every: 800}        # --set for every cell (also under each backbone, data set, protocol)
    seeds: [0]
    backbones:
      - {name: UNIP-S (MAE-L), family: UNIP, size: small, source: "${weights}/mae_large_..._infmix.pth"}
      - {name: ViT-S random, family: random init, size: small, source: none}
    datasets:
      - {name: SODA, root: "${data}/SODA", layout: soda}
    protocols:
      ft: {}                          # fine-tuning (configs/finetune/<preset>)
      lp: {}                          # linear probing, blocks 4/6/8/12 (configs/linprobe/<preset>)
      layerwise: {layers: [4, 8, 12]} # one linear probe per block ("all": every block); may name
                                      # backbones: [...] and datasets: [...] to run on a subset
    analysis: {images: "${data}/SODA/InfraredSemanticLabel/JPEGImages", num_images: 64}  # NMI for layerwise
    max_cells: 10000                  # the default: a sweep of more cells is refused before any is planned

Every cell is one ``unip finetune`` run; ``Cell.finetune_args`` is its command line and ``Cell.config`` the
settings it resolves to (checked when the sweep is read, so a typo fails before anything runs).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import yaml

from unip.checkpoint import MAX_DEPTH
from unip.data.datasets import DATASETS
from unip.engine.config import Config, find_preset, list_presets, parse_override, read_yaml
from unip.errors import ConfigError
from unip.models import list_models
from unip.models.heads import HEADS, probe_heads
from unip.models.presets import SIZE_PRESETS, preset_config
from unip.seg.train import make_config
from unip.text import printable
PROTOCOLS = ("ft", "lp", "layerwise")
PROTOCOL_NAMES = {"ft": "fine-tuning", "lp": "linear probing", "layerwise": "layer-wise linear probing"}
RANDOM_INIT = "none"
DEFAULT_PRESET = "{dataset}_{size}"
#: The most cells a sweep file may have unless it says ``max_cells: N`` (the paper's benchmark has a few hundred).
DEFAULT_MAX_CELLS = 10_000

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# ============================================================================================ the parts
@dataclass(frozen=True)
class Backbone:
    """One pre-trained (or randomly initialised) backbone: a display name, its family (MAE, DINO, UNIP, ...)
    and size, and the ``--pretrained`` source (a file, ``timm:NAME[@FILE]``, a preset name, or ``none``)."""

    name: str
    slug: str
    family: str
    size: str
    source: str
    settings: Tuple[str, ...] = ()

    @property
    def random_init(self) -> bool:
        """True for ``none`` and for a preset name (no pre-trained weights)."""
        return self.source.lower() == RANDOM_INIT or (self.source in list_models() and not Path(self.source).exists())

    @property
    def architecture(self) -> str:
        """The preset architecture of the backbone's size (the cost estimate's assumption)."""
        return self.source if self.source in list_models() else SIZE_PRESETS[self.size]


@dataclass(frozen=True)
class Dataset:
    """One segmentation data set: display name, root folder, layout and the stem of its presets."""

    name: str
    slug: str
    root: str
    layout: str
    preset_stem: str
    settings: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Protocol:
    """``ft``, ``lp`` or ``layerwise`` (``layers``: block numbers, or ``None`` for every block), with its own
    settings, its decode ``head`` (a name in ``unip.models.HEADS``; ``None``: the preset's for ``ft``, the first
    probe head, ``linear``, for the probes) and optionally the backbones / data sets (names) it is limited to."""

    kind: str
    layers: Optional[Tuple[int, ...]] = None
    settings: Tuple[str, ...] = ()
    backbones: Optional[Tuple[str, ...]] = None
    datasets: Optional[Tuple[str, ...]] = None
    head: Optional[str] = None

    def applies(self, backbone: Backbone, dataset: Dataset) -> bool:
        return ((self.backbones is None or backbone.name in self.backbones)
                and (self.datasets is None or dataset.name in self.datasets))


@dataclass(frozen=True)
class Analysis:
    """What ``unip analyze`` runs on for the NMI profiles of the layer-wise plot."""

    images: str
    num_images: int = 64
    norm: str = "infmix"
    batch_size: int = 32


@dataclass
class Sweep:
    """A sweep file, read and checked (``read_sweep``). ``unset`` lists variables without a value (allowed
    only for a dry run: their ``${name}`` stays in the text)."""

    name: str
    file: str
    preset: str
    settings: Tuple[str, ...]
    seeds: Tuple[int, ...]
    backbones: List[Backbone]
    datasets: List[Dataset]
    protocols: List[Protocol]
    analysis: Optional[Analysis]
    variables: Dict[str, Optional[str]] = field(default_factory=dict)
    unset: List[str] = field(default_factory=list)
    max_cells: int = DEFAULT_MAX_CELLS

    def backbone(self, name: str) -> Backbone:
        return next(b for b in self.backbones if b.name == name)

    def to_dict(self) -> Dict[str, Any]:
        """The sweep as JSON-able data (what the state file records and the report reads)."""
        return {
            "name": self.name, "file": self.file, "preset": self.preset, "set": list(self.settings),
            "seeds": list(self.seeds), "variables": dict(self.variables),
            "backbones": [{"name": b.name, "slug": b.slug, "family": b.family, "size": b.size, "source": b.source,
                           "random_init": b.random_init, "set": list(b.settings)} for b in self.backbones],
            "datasets": [{"name": d.name, "slug": d.slug, "root": d.root, "layout": d.layout, "preset": d.preset_stem,
                          "set": list(d.settings)} for d in self.datasets],
            "protocols": [{"kind": p.kind, "layers": list(p.layers) if p.layers else p.layers,
                           "set": list(p.settings), "backbones": _listed(p.backbones), "datasets": _listed(p.datasets),
                           "head": p.head} for p in self.protocols],
            "analysis": None if self.analysis is None else vars(self.analysis), "max_cells": self.max_cells,
        }

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "Sweep":
        """The sweep as ``to_dict`` recorded it (what ``plan_cells`` plans again for the report). A record
        written before protocol limits were recorded reads as unlimited. Raises ``KeyError``, ``TypeError`` or
        ``ValueError`` on a damaged record."""
        backbones = [Backbone(b["name"], b["slug"], b["family"], b["size"], b["source"], tuple(b.get("set", ())))
                     for b in document["backbones"]]
        datasets = [Dataset(d["name"], d["slug"], d["root"], d["layout"], d.get("preset", d["layout"]),
                            tuple(d.get("set", ()))) for d in document["datasets"]]
        protocols = [Protocol(p["kind"], _tuple(p.get("layers")), tuple(p.get("set", ())), _tuple(p.get("backbones")),
                              _tuple(p.get("datasets")), p.get("head")) for p in document["protocols"]]
        analysis = document.get("analysis")
        return cls(name=document["name"], file=document["file"], preset=document["preset"],
                   settings=tuple(document.get("set", ())), seeds=tuple(int(s) for s in document["seeds"]),
                   backbones=backbones, datasets=datasets, protocols=protocols,
                   analysis=None if analysis is None else Analysis(**analysis),
                   variables=dict(document.get("variables", {})),
                   max_cells=int(document.get("max_cells", DEFAULT_MAX_CELLS)))


@dataclass(frozen=True)
class Cell:
    """One ``unip finetune`` run: backbone × data set × protocol (× block for layer-wise probing) × seed.

    ``id`` (``<backbone>/<dataset>/<ft|lp|lp-layerNN>-seed<S>``, from the slugs) is also its folder under
    ``<out>/cells/``."""

    backbone: Backbone
    dataset: Dataset
    protocol: str
    layer: Optional[int]
    seed: int
    preset: str
    settings: Tuple[str, ...]
    head: Optional[str] = None

    @property
    def label(self) -> str:
        return {"ft": "ft", "lp": "lp"}.get(self.protocol) or f"lp-layer{self.layer:02d}"

    @property
    def id(self) -> str:
        return f"{self.backbone.slug}/{self.dataset.slug}/{self.label}-seed{self.seed}"

    @property
    def probe(self) -> bool:
        return self.protocol != "ft"

    def finetune_args(self, folder: str) -> List[str]:
        """The ``unip finetune`` arguments of this cell writing to ``folder`` (``--device`` is the runner's)."""
        args = ["finetune", self.preset]
        if self.protocol == "lp":
            args += ["--probe", self.head or probe_heads()[0]]
        elif self.protocol == "layerwise":
            args += ["--probe-layer", str(self.layer)] + (["--probe", self.head] if self.head else [])
        elif self.head:
            args += ["--head", self.head]
        args += ["--pretrained", self.backbone.source, "--data", self.dataset.root, "--dataset", self.dataset.layout,
                 "--out", folder, "--seed", str(self.seed), "--resume", "auto"]
        for setting in self.settings:
            args += ["--set", setting]
        return args

    def check(self) -> None:
        """``ConfigError`` naming the cell when its settings are not valid (what ``config`` checks)."""
        self._resolved()

    def config(self, folder: str = "cell") -> Config:
        """The settings ``unip finetune`` resolves for this cell (``unip.seg.train.make_config``); raises
        ``ConfigError`` naming the cell. Cells that differ only in seed and folder share one resolution (the
        preset files are read once), so planning a sweep takes time linear in its cells, and little of it."""
        shared, given = self._resolved()
        config = copy.deepcopy(shared)
        for key, value in (("output", folder), ("seed", self.seed)):
            if f"run.{key}" not in given:  # a --set of the sweep file wins, as in make_config
                config["run"][key] = value
        return config

    def _resolved(self) -> Tuple[Config, FrozenSet[str]]:
        try:
            return _resolve(self.preset, self.settings, self.backbone.source, self.dataset.root, self.dataset.layout,
                            self.probe, self.layer, self.head)
        except ConfigError as err:
            raise ConfigError(f"cell {self.id}: {err}") from None


@functools.lru_cache(maxsize=1024)
def _resolve(preset: str, settings: Tuple[str, ...], source: str, root: str, layout: str, probe: bool,
             layer: Optional[int], head: Optional[str]) -> Tuple[Config, FrozenSet[str]]:
    """``(config, keys the settings set)`` of the cells with these coordinates, resolved for seed 0 in the folder
    ``cell`` (not to be changed: ``Cell.config`` copies it, with each cell's seed and folder). ``ConfigError`` when
    they are not valid. Cleared by ``read_sweep``."""
    values: Dict[str, Any] = {"model.pretrained": source, "data.path": root, "data.dataset": layout,
                              "run.output": "cell", "run.seed": 0, "run.resume": "auto"}
    if head or probe:
        values["model.head"] = head or probe_heads()[0]
    if layer is not None:
        values["model.probe_layer"] = layer
    config = make_config(preset, settings, values, kind="linprobe" if probe else "finetune")
    return config, frozenset(parse_override(text)[0] for text in settings)


# ============================================================================================ reading
def find_sweep(name: str) -> Path:
    """A sweep file: a path, or the name of a shipped sweep (``configs/sweeps/<name>.yaml``: paper, tiny)."""
    return find_preset(name, "sweeps")


def read_sweep(source: str, variables: Optional[Mapping[str, str]] = None, allow_unset: bool = False) -> Sweep:
    """Read and check the sweep file ``source`` (a path or a shipped sweep's name), filling ``${name}`` from
    ``variables`` (the CLI's ``--var``) over the file's ``vars``. Raises ``ConfigError`` naming the file, the
    entry and the fix; a variable without a value is an error unless ``allow_unset`` (dry run)."""
    path = find_sweep(source)
    where = str(path)
    document = read_yaml(path)
    _resolve.cache_clear()  # presets are read again for each sweep read (they may have changed on disk)
    _only_keys(document, ("name", "vars", "preset", "set", "seeds", "backbones", "datasets", "protocols",
                          "analysis", "max_cells"), where)
    values = _variables(document.get("vars"), variables or {}, where)
    unset = sorted(name for name, value in values.items() if value is None)
    document = _substitute(document, values, where, allow_unset)
    preset = _text(document.get("preset", DEFAULT_PRESET), f"{where}: preset")
    sweep = Sweep(
        name=_text(document.get("name", path.stem), f"{where}: name"), file=where, preset=preset,
        settings=_settings(document.get("set"), f"{where}: set"), seeds=_seeds(document.get("seeds", [0]), where),
        backbones=_unique([_backbone(entry, f"{where}: backbones[{i}]")
                           for i, entry in enumerate(_entries(document, "backbones", where))], "backbone", where),
        datasets=_unique([_dataset(entry, f"{where}: datasets[{i}]", "{dataset}" in preset)
                          for i, entry in enumerate(_entries(document, "datasets", where))], "data set", where),
        protocols=_protocols(document.get("protocols"), where),
        analysis=_analysis(document.get("analysis"), where), variables=values, unset=unset,
        max_cells=_max_cells(document.get("max_cells", DEFAULT_MAX_CELLS), where))
    _check_references(sweep)
    if any(p.kind == "layerwise" for p in sweep.protocols) and sweep.analysis is None:
        raise ConfigError(f"{where}: the layerwise protocol needs an 'analysis:' entry with the images folder that "
                          "unip analyze profiles (e.g. analysis: {images: DIR}) for the NMI next to each curve")
    _check_size(sweep)
    return sweep


def parse_variables(pairs: Sequence[str]) -> Dict[str, str]:
    """``["data=/d", "weights=/w"]`` (the CLI's ``--var``) → ``{"data": "/d", "weights": "/w"}``; raises
    ``ConfigError`` for a pair without ``=``."""
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--var {printable(pair)!r}: expected NAME=VALUE, e.g. --var data=/data")
        values[name.strip()] = value
    return values


def plan_cells(sweep: Sweep) -> List[Cell]:
    """Every cell of the sweep, in a fixed order: backbone, data set, protocol (ft, lp, layers), seed."""
    cells = []
    for backbone in sweep.backbones:
        for dataset in sweep.datasets:
            preset = _preset_name(sweep, backbone, dataset)
            for protocol in sweep.protocols:
                if not protocol.applies(backbone, dataset):
                    continue
                random = backbone.source.lower() == RANDOM_INIT
                extra = (f"model.backbone={SIZE_PRESETS[backbone.size]}",) if random else ()
                settings = ("run.progress=false", *extra, *sweep.settings, *dataset.settings, *backbone.settings,
                            *protocol.settings)
                for layer in _probed_blocks(sweep, protocol, backbone):
                    for seed in sweep.seeds:
                        cells.append(Cell(backbone, dataset, protocol.kind, layer, seed, preset, settings,
                                          protocol.head))
    return cells


def count_cells(sweep: Sweep) -> int:
    """How many cells ``plan_cells`` plans, counted without planning them."""
    return len(sweep.seeds) * sum(len(_probed_blocks(sweep, protocol, backbone)) for backbone in sweep.backbones
                                  for dataset in sweep.datasets for protocol in sweep.protocols
                                  if protocol.applies(backbone, dataset))


def _probed_blocks(sweep: Sweep, protocol: Protocol, backbone: Backbone) -> Sequence[Optional[int]]:
    """The probed blocks of ``protocol``'s cells of ``backbone`` (``[None]``: not a layer-wise protocol); raises
    ``ConfigError`` for a block the backbone's architecture does not have."""
    if protocol.kind != "layerwise":
        return [None]

    depth = int(preset_config(backbone.architecture)["depth"])
    layers = protocol.layers or range(1, depth + 1)
    if max(layers) > depth:
        raise ConfigError(f"{sweep.file}: protocols.layerwise: block {max(layers)} of backbone "
                          f"{printable(backbone.name)!r}, whose architecture ({backbone.architecture}) has blocks "
                          f"1..{depth}; fix its layers (or limit the protocol with backbones:)")
    return layers


def _check_size(sweep: Sweep) -> None:
    """``ConfigError`` when the sweep has more cells than its ``max_cells`` (a long seed list, say): said before
    any cell is planned."""
    count = count_cells(sweep)
    if count > sweep.max_cells:
        others = count // len(sweep.seeds)
        raise ConfigError(f"{sweep.file}: {count:,} cells ({len(sweep.seeds):,} seed(s) × {others:,} backbone, data "
                          f"set, protocol and block combination(s)) are more than max_cells ({sweep.max_cells:,}); "
                          "shorten the lists, or raise max_cells: N in the sweep file if you mean it")


def slug(name: str) -> str:
    """A folder-safe form of a display name: lower case, runs of other characters → ``-``."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.")


# ============================================================================================ helpers
def _listed(values: Optional[Tuple[Any, ...]]) -> Optional[List[Any]]:
    return None if values is None else list(values)


def _tuple(values: Optional[Sequence[Any]]) -> Optional[Tuple[Any, ...]]:
    return None if values is None else tuple(values)


def _preset_name(sweep: Sweep, backbone: Backbone, dataset: Dataset) -> str:
    try:
        return sweep.preset.format(dataset=dataset.preset_stem, size=backbone.size)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"{sweep.file}: preset {sweep.preset!r}: only {{dataset}} and {{size}} may be filled in "
                          f"({err})") from None


def _only_keys(entry: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = [key for key in entry if key not in allowed]
    if unknown:
        raise ConfigError(f"{where}: unknown key {printable(unknown[0])!r}; allowed: {', '.join(allowed)}")


def _mapping(value: Any, where: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping (key: value), got {type(value).__name__}")
    return value


def _text(value: Any, where: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected a non-empty text, got {printable(value)!r}")
    return value.strip()


def _entries(document: Mapping[str, Any], key: str, where: str) -> List[Dict[str, Any]]:
    entries = document.get(key)
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: '{key}:' must be a non-empty list")
    return [_mapping(entry, f"{where}: {key}[{i}]") for i, entry in enumerate(entries)]


def _variables(declared: Any, given: Mapping[str, str], where: str) -> Dict[str, Optional[str]]:
    values: Dict[str, Optional[str]] = {}
    for name, value in _mapping(declared or {}, f"{where}: vars").items():
        if not _VARIABLE.fullmatch(f"${{{name}}}"):
            raise ConfigError(f"{where}: vars: {printable(name)!r} is not a variable name (letters, digits, _)")
        values[name] = None if value is None else _text(value, f"{where}: vars.{name}")
    for name, value in given.items():
        if name not in values:
            known = ", ".join(values) or "none"
            raise ConfigError(f"--var {printable(name)}: {where} has no such variable (its vars: {known})")
        values[name] = value
    return values


def _substitute(value: Any, variables: Mapping[str, Optional[str]], where: str, allow_unset: bool) -> Any:
    """``value`` with ``${name}`` filled in every text (recursively)."""
    if isinstance(value, dict):
        return {key: (value[key] if key == "vars" else _substitute(value[key], variables, where, allow_unset))
                for key in value}
    if isinstance(value, list):
        return [_substitute(item, variables, where, allow_unset) for item in value]
    if not isinstance(value, str):
        return value

    def fill(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in variables:
            raise ConfigError(f"{where}: ${{{name}}} is not declared; add it under vars: (or use another name)")
        if variables[name] is None:
            if allow_unset:
                return match.group(0)
            raise ConfigError(f"{where}: ${{{name}}} has no value; pass --var {name}=VALUE (or set vars.{name})")
        return str(variables[name])

    return _VARIABLE.sub(fill, value)


def _settings(value: Any, where: str) -> Tuple[str, ...]:
    """``set:`` as ``--set`` texts: a mapping ``{dotted.key: value}`` or a list of ``key=value`` texts."""
    if value is None:
        return ()
    if isinstance(value, list):
        texts = tuple(_text(item, where) for item in value)
        bad = next((t for t in texts if "=" not in t), None)
        if bad is not None:
            raise ConfigError(f"{where}: {printable(bad)!r} is not key=value")
        return texts
    return tuple(f"{_text(key, where)}={_yaml_value(item)}" for key, item in _mapping(value, where).items())


def _yaml_value(value: Any) -> str:
    """``value`` as the text ``--set`` parses back to it (YAML)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _seeds(value: Any, where: str) -> Tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in value):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers >= 0, got {printable(value)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: seeds lists a seed twice: {value}")
    return tuple(value)


def _max_cells(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where}: max_cells must be a whole number >= 1, got {printable(value)}")
    return value


def _named(entry: Mapping[str, Any], where: str) -> Tuple[str, str]:
    name = _text(entry.get("name"), f"{where}: name")
    folder = slug(name)
    if not folder:
        raise ConfigError(f"{where}: name {printable(name)!r} needs a letter or digit (it names the cell folders)")
    return name, folder


def _backbone(entry: Mapping[str, Any], where: str) -> Backbone:
    _only_keys(entry, ("name", "family", "size", "source", "set"), where)
    name, folder = _named(entry, where)
    size = _text(entry.get("size"), f"{where}: size").lower()
    if size not in SIZE_PRESETS:
        raise ConfigError(f"{where}: size {printable(size)!r} must be one of {', '.join(SIZE_PRESETS)} (it picks the "
                          "preset and, for source: none, the architecture)")
    source = _text(entry.get("source"), f"{where}: source (a checkpoint file, timm:NAME[@FILE], or none)")
    return Backbone(name, folder, _text(entry.get("family", name), f"{where}: family"), size, _source(source),
                    _settings(entry.get("set"), f"{where}: set"))


def _source(source: str) -> str:
    """An absolute path for a file source (cells may run from elsewhere); ``none``, presets, ``timm:`` as given."""
    if source.lower() == RANDOM_INIT or source.startswith("timm:") or "${" in source or (
            source in list_models() and not Path(source).exists()):
        return source
    return os.path.abspath(os.path.expanduser(source))


def _dataset(entry: Mapping[str, Any], where: str, needs_stem: bool = True) -> Dataset:
    """A ``datasets:`` entry; ``needs_stem``: the sweep's preset names presets by data set (``{dataset}_{size}``),
    so a layout without presets of its own needs ``preset:``, the stem of the presets to use."""
    _only_keys(entry, ("name", "root", "layout", "preset", "set"), where)
    name, folder = _named(entry, where)
    root = _text(entry.get("root"), f"{where}: root")
    layout = _text(entry.get("layout", "auto"), f"{where}: layout").lower()
    layouts = ["auto", *DATASETS]
    if layout not in layouts:
        raise ConfigError(f"{where}: layout {printable(layout)!r} must be one of {', '.join(layouts)}")
    stems = preset_stems()
    stem = entry.get("preset", layout if layout in stems or not needs_stem else None)
    if stem is None:
        raise ConfigError(f"{where}: a {layout} data set needs 'preset:', the stem of its presets ({', '.join(stems)}: "
                          "whose iterations and schedule to use)")
    root = root if "${" in root else os.path.abspath(os.path.expanduser(root))
    return Dataset(name, folder, root, layout, _text(stem, f"{where}: preset"), _settings(entry.get("set"),
                                                                                          f"{where}: set"))


def _unique(items: List[Any], what: str, where: str) -> List[Any]:
    for kind in ("name", "slug"):
        seen: Dict[str, str] = {}
        for item in items:
            key = getattr(item, kind)
            if key in seen:
                raise ConfigError(f"{where}: two {what}s named {printable(seen[key])!r} and {printable(item.name)!r} "
                                  f"(their folders would both be {item.slug!r}); rename one")
            seen[key] = item.name
    return items


def _protocols(value: Any, where: str) -> List[Protocol]:
    entries = _mapping(value, f"{where}: protocols")
    if not entries:
        raise ConfigError(f"{where}: protocols: name at least one of {', '.join(PROTOCOLS)}")
    protocols = []
    for kind, entry in entries.items():
        at = f"{where}: protocols.{printable(kind)}"
        if kind not in PROTOCOLS:
            raise ConfigError(f"{at}: unknown protocol; choose from {', '.join(PROTOCOLS)}")
        entry = _mapping(entry if entry is not None else {}, at)
        _only_keys(entry, ("set", "backbones", "datasets", "head") + (("layers",) if kind == "layerwise" else ()), at)
        layers = None
        if kind == "layerwise":
            layers = _layers(entry.get("layers"), at)
        protocols.append(Protocol(kind, layers, _settings(entry.get("set"), f"{at}.set"),
                                  _names(entry.get("backbones"), f"{at}.backbones"),
                                  _names(entry.get("datasets"), f"{at}.datasets"), _head(entry.get("head"), kind, at)))
    return protocols


def _head(value: Any, kind: str, where: str) -> Optional[str]:
    """A protocol's ``head:``: a fine-tuning head for ``ft``, a probe head for the probes (``unip.models.HEADS``)."""
    if value is None:
        return None
    probe = kind != "ft"
    fitting = [name for name, head in HEADS.items() if head.probe == probe]
    if value not in fitting:
        raise ConfigError(f"{where}.head must be one of {', '.join(fitting)} ({PROTOCOL_NAMES[kind]}), got "
                          f"{printable(value)}")
    return str(value)


def preset_stems() -> List[str]:
    """The data sets with fine-tuning presets of their own (``<stem>_<size>``, e.g. ``soda_small``): a sweep's data
    set of that layout takes them without ``preset:``."""
    presets = set(list_presets("finetune"))
    return [name for name in DATASETS if any(f"{name}_{size}" in presets for size in SIZE_PRESETS)]


def _layers(value: Any, where: str) -> Optional[Tuple[int, ...]]:
    if value == "all":
        return None

    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_DEPTH for v in value):
        raise ConfigError(f"{where}.layers must be 'all' or a list of block numbers (1 = first), got "
                          f"{printable(value)}")
    return tuple(sorted(set(value)))


def _names(value: Any, where: str) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of names")
    return tuple(_text(v, where) for v in value)


def _analysis(value: Any, where: str) -> Optional[Analysis]:
    if value is None:
        return None
    entry = _mapping(value, f"{where}: analysis")
    _only_keys(entry, ("images", "num_images", "norm", "batch_size"), f"{where}: analysis")
    images = _text(entry.get("images"), f"{where}: analysis.images (a folder of images for unip analyze)")
    numbers = {}
    for key, default, low in (("num_images", 64, 0), ("batch_size", 32, 1)):
        number = entry.get(key, default)
        if not isinstance(number, int) or isinstance(number, bool) or number < low:
            raise ConfigError(f"{where}: analysis.{key} must be an integer >= {low}, got {printable(number)}")
        numbers[key] = number
    return Analysis(images if "${" in images else os.path.abspath(os.path.expanduser(images)),
                    norm=_text(entry.get("norm", "infmix"), f"{where}: analysis.norm"), **numbers)


def _check_references(sweep: Sweep) -> None:
    backbones, datasets = {b.name for b in sweep.backbones}, {d.name for d in sweep.datasets}
    for protocol in sweep.protocols:
        for names, known, what in ((protocol.backbones, backbones, "backbones"),
                                   (protocol.datasets, datasets, "datasets")):
            missing = [n for n in names or () if n not in known]
            if missing:
                raise ConfigError(f"{sweep.file}: protocols.{protocol.kind}.{what} names {printable(missing[0])!r}, "
                                  f"which is not in '{what}:' ({', '.join(sorted(known))})")


__all__ = ["Analysis", "Backbone", "Cell", "DEFAULT_MAX_CELLS", "Dataset", "PROTOCOLS", "Protocol", "Sweep",
           "count_cells", "find_sweep", "parse_variables", "plan_cells", "preset_stems", "read_sweep", "slug"]
