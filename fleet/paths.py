"""Paths under the fleet home, checked: a name from a message or a spec never leads outside it."""

from __future__ import annotations

from pathlib import Path


def under(root: Path, *parts: str) -> Path:
    """root / parts, refused (ValueError) unless it resolves to a place inside root."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"{'/'.join(parts)!r} leads outside {base}")
    return path
