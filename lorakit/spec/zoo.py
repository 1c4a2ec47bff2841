"""Read `adapters_zoo/`: family presets (TOML) and bundled model configs (JSON).

The zoo is data. This module only finds it, parses it, and answers
"which preset covers this model" and "which blocks does this model have".
"""

from __future__ import annotations

import fnmatch
import functools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import SpecError, closest


def zoo_dir() -> Path:
    """`adapters_zoo/` beside the package (a checkout) or installed next to it (a wheel)."""
    try:
        import adapters_zoo

        return Path(adapters_zoo.__file__).parent
    except ImportError:  # running from a checkout without installing
        return Path(__file__).resolve().parents[2] / "adapters_zoo"


# The preset schema: every key a preset file may hold, with its type. An unknown key is an error.
_LISTS = ("model_types", "blocks", "embeddings", "heads", "train_fully")
_TABLES = ("groups", "recommended", "left_out")
_RECOMMENDED = {"r": int, "alpha": (int, float), "dropout": (int, float), "learning_rate": (int, float),
                "targets": (str, list)}


@dataclass(frozen=True)
class Preset:
    name: str
    model_types: tuple[str, ...]
    blocks: tuple[str, ...]
    embeddings: tuple[str, ...]
    heads: tuple[str, ...]
    train_fully: tuple[str, ...]
    groups: dict[str, tuple[str, ...]]
    recommended: dict[str, Any]
    left_out: dict[str, str] | None = None  # group -> why the default targets leave it out

    def group_matches(self, group: str, relative_name: str | None, full_name: str) -> bool:
        """A group's globs match a block-relative name ("self_attn.q_proj"), or a full name
        ("*vision_tower.*"): the latter is how a group names a part of the model outside the blocks."""
        return any((relative_name is not None and fnmatch.fnmatchcase(relative_name, pattern))
                   or fnmatch.fnmatchcase(full_name, pattern) for pattern in self.groups[group])


def _schema_error(path: Path, what: str) -> SpecError:
    return SpecError(f"preset {path}: {what}", hint="adapters_zoo/presets/README.md lists the keys and their types")


def _strings(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _schema_error(path, f"{key} must be a list of strings, got {value!r}")
    return tuple(value)


def read_preset(path: Path) -> Preset:
    """Parse and validate one preset file."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise _schema_error(path, f"not valid TOML ({exc})") from None
    for key in set(data) - {*_LISTS, *_TABLES}:
        near = closest(key, [*_LISTS, *_TABLES])
        raise _schema_error(path, f"unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        raise _schema_error(path, "[groups] must be a table of name = [globs]")
    recommended = dict(data.get("recommended", {}))
    for key, value in recommended.items():
        if key not in _RECOMMENDED:
            raise _schema_error(path, f"unknown key {key!r} in [recommended]; known: {', '.join(_RECOMMENDED)}")
        if isinstance(value, bool) or not isinstance(value, _RECOMMENDED[key]):
            raise _schema_error(path, f"[recommended] {key} has the wrong type: {value!r}")
    left_out = dict(data.get("left_out", {}))
    for key, value in left_out.items():
        if key not in groups or not isinstance(value, str):
            raise _schema_error(path, f"[left_out] {key} must name a group of [groups] and say why, got {value!r}")
    return Preset(name=path.stem, **{k: _strings(path, k, data.get(k, [])) for k in _LISTS},
                  groups={k: _strings(path, f"groups.{k}", v) for k, v in groups.items()}, recommended=recommended,
                  left_out=left_out)


@functools.cache
def presets() -> dict[str, Preset]:
    """Every preset in the zoo, by file name."""
    return {p.stem: read_preset(p) for p in sorted((zoo_dir() / "presets").glob("*.toml"))}


def preset_for(model: Any = None, name: str | None = None) -> Preset:
    """The preset named `name`, else the one covering the model's `model_type`, else `default`."""
    table = presets()
    if name is not None:
        if name not in table:
            near = closest(name, table)
            raise SpecError(f"unknown preset {name!r}",
                            hint=f"presets are: {', '.join(table)}" + (f"; did you mean {near[0]!r}?" if near else ""))
        return table[name]
    return preset_for_type(getattr(getattr(model, "config", None), "model_type", None))


def preset_for_type(model_type: str | None) -> Preset:
    """The preset covering a `config.model_type`, else `default`."""
    table = presets()
    return next((p for p in table.values() if model_type in p.model_types), table["default"])


@dataclass(frozen=True)
class ModuleRule:
    """Modules (`modules`, suffixes) inside a module whose class matches `inside` (globs) that cannot take
    LoRA (`lora` False) or bitsandbytes (`quantize` False), and why (adapters_zoo/module_rules.toml)."""

    inside: tuple[str, ...]
    modules: tuple[str, ...]
    reason: str
    lora: bool = True
    quantize: bool = True


@functools.cache
def module_rules() -> tuple[ModuleRule, ...]:
    path = zoo_dir() / "module_rules.toml"
    rules = []
    for entry in tomllib.loads(path.read_text()).get("rule", []):
        unknown = set(entry) - {"inside", "modules", "reason", "lora", "quantize"}
        if unknown or not isinstance(entry.get("reason"), str) or entry.get("lora", True) and entry.get(
                "quantize", True):
            raise _schema_error(path, f"rule {entry!r}: needs inside, modules, reason and lora = false and/or "
                                      f"quantize = false" + (f" (unknown: {', '.join(sorted(unknown))})" if unknown
                                                             else ""))
        rules.append(ModuleRule(inside=_strings(path, "inside", entry.get("inside")),
                                modules=_strings(path, "modules", entry.get("modules")), reason=entry["reason"],
                                lora=bool(entry.get("lora", True)), quantize=bool(entry.get("quantize", True))))
    return tuple(rules)


def ruled_modules(model: Any) -> dict[str, ModuleRule]:
    """Module name -> the rule that holds for it in `model`."""
    found = {}
    for name, module in model.named_modules():
        for rule in module_rules():
            if any(fnmatch.fnmatchcase(type(module).__name__, glob) for glob in rule.inside):
                for child in rule.modules:
                    full = f"{name}.{child}" if name else child
                    try:
                        model.get_submodule(full)
                    except AttributeError:
                        continue
                    found.setdefault(full, rule)
    return found


@functools.cache
def architectures() -> tuple[dict, ...]:
    """The architecture hub, adapters_zoo/architectures.toml: one row per family lorakit supports (name,
    model_type, task, group, config, and `limits`: check -> why the family does not support it)."""
    rows = tomllib.loads((zoo_dir() / "architectures.toml").read_text())["family"]
    for row in rows:
        missing = {"name", "model_type", "task", "group", "config"} - set(row)
        if missing:
            raise SpecError(f"architectures.toml: row {row.get('name', '?')} lacks {', '.join(sorted(missing))}")
    return tuple(rows)


def _matches_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def find_block_lists(model: Any, preset: Preset) -> list[str]:
    """Names of the ModuleLists that hold the model's repeated blocks.

    The preset names them; without a preset, any outermost ModuleList counts whose children hold parameters
    and are all of one class, or all layers of one kind by name (Jamba alternates JambaAttentionDecoderLayer
    and JambaMambaDecoderLayer).
    """
    import torch

    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if preset.blocks:
        return [n for n, _ in lists if any(_matches_suffix(n, b) for b in preset.blocks)]
    found: list[str] = []
    for name, module_list in lists:
        if any(name.startswith(f + ".") for f in found):
            continue
        kinds = {type(child).__name__ for child in module_list}
        alike = len(kinds) == 1 or any(all(k.endswith(end) for k in kinds) for end in _LAYER_ENDINGS)
        if alike and any(True for _ in module_list[0].parameters()):
            found.append(name)
    return found


_LAYER_ENDINGS = ("DecoderLayer", "EncoderLayer", "Layer", "Block")


def block_of(name: str, block_lists: list[str]) -> tuple[str, int, str] | None:
    """(stack, index, name relative to the block) for a module or parameter name inside a block."""
    for stack in block_lists:
        prefix = stack + "."
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index.isdigit():
                return stack, int(index), rest
    return None


# ---- bundled configs ------------------------------------------------------

@functools.cache
def bundled_configs() -> dict[str, Path]:
    """Hub id -> bundled config.json path."""
    folder = zoo_dir() / "configs"
    return {p.stem.replace("--", "/"): p for p in sorted(folder.glob("*.json"))}


def find_bundled_config(name: str) -> tuple[str, dict] | None:
    """(hub id, config dict) for a bundled model, matched by full id or by its name part, any case."""
    table = bundled_configs()
    wanted = name.lower()
    for model_id, path in table.items():
        if wanted in (model_id.lower(), model_id.split("/")[-1].lower()):
            return model_id, json.loads(path.read_text())
    return None


def zoo_names() -> list[str]:
    return list(bundled_configs())
