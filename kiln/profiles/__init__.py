"""Profiles: named presets (architecture + recipe) shipped as YAML data in this folder.

A profile may name a ``base`` profile; mappings merge key by key and everything else replaces.
``--profile`` also accepts a path to a user's YAML file, which may itself name a shipped ``base``.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.config import Config, ConfigBuilder, load_yaml, parse_override
from kiln.errors import KilnError

PROFILE_DIR = Path(__file__).parent


def available() -> list[str]:
    """Names of the shipped profiles (hidden ``_base`` files excluded)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        tree = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise KilnError(f"invalid YAML: {getattr(exc, 'problem', exc)}", path, line) from None
    except UnicodeDecodeError:
        raise KilnError("not UTF-8 text", path) from None
    if not isinstance(tree, dict):
        raise KilnError("a profile must be a YAML mapping", path)
    return tree


def key_lines(path: Path) -> dict[str, int]:
    """The line of every setting in a profile YAML (``train.epochs`` -> 3), for errors that name it."""
    import yaml

    from kiln.config import sections, yaml_loader

    lines: dict[str, int] = {}

    def walk(node: Any, prefix: str) -> None:
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode) and (key in sections() or key == "model"):
                walk(value_node, key + ".")

    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml_loader())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if isinstance(root, yaml.MappingNode):
        walk(root, "")
    return lines


def deep_merge(base: dict, top: dict) -> dict:
    """Merge ``top`` over ``base``: nested mappings merge, other values replace."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


T5_EFFICIENT = re.compile(r"t5-efficient-(tiny|mini|small|base|large|xl|xxl)((?:-(?:el|dl|nl|dm|ff|kv|nh)\d+)*)")
# Name-grammar key -> T5Config keys it sets (``nl`` sets encoder and decoder depth together).
T5_KEYS = {"el": ("num_layers",), "dl": ("num_decoder_layers",), "nl": ("num_layers", "num_decoder_layers"),
           "dm": ("d_model",), "ff": ("d_ff",), "kv": ("d_kv",), "nh": ("num_heads",)}


def t5_efficient(name: str) -> dict | None:
    """The profile tree for a ``t5-efficient-SIZE[-elN|-dlN|-nlN|-dmN|-ffN|-kvN|-nhN]...`` name.

    The base size is the ``t5-SIZE`` profile (google/t5-efficient-SIZE's configuration); each
    variation overrides one dimension, as in the released google/t5-efficient-* checkpoints.
    """
    match = T5_EFFICIENT.fullmatch(name)
    if match is None:
        return None
    size, variations = match.group(1), match.group(2)
    config: dict[str, int] = {}
    for key, value in re.findall(r"-(el|dl|nl|dm|ff|kv|nh)(\d+)", variations):
        if int(value) < 1:
            raise KilnError(f"profile '{name}': {key}{value} must be at least 1")
        config.update(dict.fromkeys(T5_KEYS[key], int(value)))
    return {"base": f"t5-{size}", "name": name,
            "description": f"T5-efficient {size}{variations} (google/{name} architecture).",
            "model": {"config": config}}


def locate(name: str) -> Path:
    """Path of a shipped profile or of a user's YAML; an unknown name lists the close matches."""
    candidate = Path(name)
    if candidate.suffix in {".yaml", ".yml"} or candidate.is_file():  # not a `t5-small/` checkpoint dir
        if not candidate.is_file():
            raise KilnError("profile file not found", candidate)
        return candidate
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        known = available()
        if name.startswith("t5-efficient"):
            known += [f"t5-efficient-{size}" for size in ("tiny", "mini", "small", "base", "large", "xl", "xxl")]
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `kiln profiles` lists them"
        raise KilnError(f"unknown profile '{name}'{hint}")
    return path


def layers(name: str, _seen: tuple[str, ...] = ()) -> list[tuple[dict, str, Path]]:
    """The chain of ``(tree, source, path)`` from the root base to ``name`` itself."""
    synthesized = t5_efficient(name)
    if synthesized is not None and not (PROFILE_DIR / f"{name}.yaml").exists():
        chain = layers(synthesized.pop("base"), (*_seen, name))
        base_model: dict = {}
        for tree, _, _ in chain:
            base_model = deep_merge(base_model, tree.get("model") or {})
        config = {**base_model.get("config", {}), **synthesized["model"]["config"]}
        from kiln.models import base_model_parameters

        synthesized["params"] = base_model_parameters(base_model.get("type", "t5"), config)
        return [*chain, (synthesized, "profile", PROFILE_DIR / f"{name}.yaml")]
    path = locate(name)
    if str(path) in _seen:
        raise KilnError("profile inherits from itself", path)
    tree = _read_yaml(path)
    source = "profile" if path.parent.resolve() == PROFILE_DIR.resolve() else "file"
    base = tree.pop("base", None)
    if base and Path(str(base)).suffix in {".yaml", ".yml"} and (path.parent / str(base)).is_file():
        base = path.parent / str(base)  # a user's YAML names its base relative to itself
    try:
        chain = layers(str(base), (*_seen, str(path))) if base else []
    except KilnError as err:
        if err.path is not None:
            raise
        raise KilnError(f"base: {err.message}", path, key_lines(path).get("base")) from None
    return [*chain, (tree, source, path)]


def builder_for(
    profile: str, flags: dict[str, Any] | None = None, overrides: Sequence[str] = ()
) -> ConfigBuilder:
    """Merge a profile, CLI flags (``{"train.epochs": 1}``) and ``-c key=value`` overrides."""
    builder = ConfigBuilder()
    for tree, source, path in layers(profile):
        builder.apply(tree, source, str(path), lines=functools.partial(key_lines, path) if source == "file" else None)
    for key, value in (flags or {}).items():
        if value is not None:
            builder.set(key, value, "flag")
    for text in overrides:
        key, value = parse_override(text)
        builder.set(key, value, "flag")
    # The two batch settings are alternatives: asking for a token budget on a profile that trains
    # fixed-size batches (crammed-BERT's) means the budget, not a silently ignored flag.
    if builder.sources["train.batch_tokens"] == "flag" and builder.sources["train.batch_size"] != "flag":
        builder.set("train.batch_size", 0, "flag")
    return builder


def load(profile: str, **flags: Any) -> Config:
    """Load a profile by name or path, with optional dotted-key overrides."""
    return builder_for(profile, flags).build()
