"""Profiles: named presets (architecture + recipe) shipped as YAML data in this folder.

A profile may name a ``base`` profile; mappings merge key by key and everything else replaces.
``--profile`` also accepts a path to a user's YAML file, which may itself name a shipped ``base``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from kiln.config import Config, ConfigBuilder, parse_override
from kiln.errors import KilnError

PROFILE_DIR = Path(__file__).parent


def available() -> list[str]:
    """Names of the shipped profiles (hidden ``_base`` files excluded)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise KilnError(f"invalid YAML: {getattr(exc, 'problem', exc)}", path, line) from None
    except UnicodeDecodeError:
        raise KilnError("not UTF-8 text", path) from None
    if not isinstance(tree, dict):
        raise KilnError("a profile must be a YAML mapping", path)
    return tree


def deep_merge(base: dict, top: dict) -> dict:
    """Merge ``top`` over ``base``: nested mappings merge, other values replace."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def locate(name: str) -> Path:
    """Path of a shipped profile or of a user's YAML; an unknown name lists the close matches."""
    candidate = Path(name)
    if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
        if not candidate.is_file():
            raise KilnError("profile file not found", candidate)
        return candidate
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, available(), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `kiln profiles` lists them"
        raise KilnError(f"unknown profile '{name}'{hint}")
    return path


def layers(name: str, _seen: tuple[str, ...] = ()) -> list[tuple[dict, str, Path]]:
    """The chain of ``(tree, source, path)`` from the root base to ``name`` itself."""
    path = locate(name)
    if str(path) in _seen:
        raise KilnError("profile inherits from itself", path)
    tree = _read_yaml(path)
    source = "profile" if path.parent.resolve() == PROFILE_DIR.resolve() else "file"
    base = tree.pop("base", None)
    chain = layers(str(base), (*_seen, str(path))) if base else []
    return [*chain, (tree, source, path)]


def builder_for(
    profile: str, flags: dict[str, Any] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ConfigBuilder:
    """Merge a profile, CLI flags (``{"train.epochs": 1}``) and ``-c key=value`` overrides."""
    builder = ConfigBuilder()
    for tree, source, path in layers(profile):
        builder.apply(tree, source, str(path))
    for key, value in (flags or {}).items():
        if value is not None:
            builder.set(key, value, "flag")
    for text in overrides:
        key, value = parse_override(text)
        builder.set(key, value, "flag")
    return builder


def load(profile: str, **flags: Any) -> Config:
    """Load a profile by name or path, with optional dotted-key overrides."""
    return builder_for(profile, flags).build()
