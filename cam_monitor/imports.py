"""Callables named by an import path (``"package.module:function"``), so YAML configs can name them.

Resolved with importlib, never ``eval``; the target must be callable.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def import_callable(path: str, what: str) -> Callable[..., Any]:
    """The callable at ``path`` (``pkg.module:name`` or ``pkg.module.name``); ``what`` names the
    argument in the errors."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} must be a callable or an import path 'package.module:function', got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{what} {path!r} is not an import path 'package.module:function'")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{what} {path!r}: cannot import it ({err})") from err
    if not callable(target):
        raise ValueError(f"{what} {path!r} is not callable")
    return target


def as_callable(spec: Callable[..., Any] | str | None, what: str) -> Callable[..., Any] | None:
    """``spec`` itself when callable (or None), else the callable its import path names."""
    return spec if spec is None or callable(spec) else import_callable(spec, what)
