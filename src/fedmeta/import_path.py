"""Objects a config names by import path, ``"package.module:name"``, and what it records for those it cannot name.

A model factory, dataset builder, loss or metric of one's own goes into a config as the
path that imports it, so a run directory's ``config.toml`` can rebuild it in another
process (``fedmeta eval``, ``fedmeta run --resume``). An object passed from Python that
no path imports (an ``nn.Module`` instance, a function of ``__main__``) is recorded as
``<passed from Python: ...>``: a value naming what must be passed again.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Any, Callable

IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
PASSED = re.compile(r"<passed from Python: [^<>]*>")


def is_import_path(text: str) -> bool:
    """Whether ``text`` has the form ``package.module:name``."""
    return IMPORT_PATH.fullmatch(text) is not None


def passed_from_python(what: str) -> str:
    """The value a config records for an object passed from Python that no import path names."""
    return f"<passed from Python: {what.replace('<', '').replace('>', '')}>"


def is_passed_from_python(text: str) -> bool:
    return PASSED.fullmatch(text) is not None


def load(path: str, key: str) -> Any:
    """The object ``path`` names, importing its module; a failure is a ValueError naming ``key``."""
    module_name, _, attributes = path.partition(":")
    try:
        found = importlib.import_module(module_name)
    except Exception as error:  # ImportError, or whatever the module's own code raises on import
        detail = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{key} = {path!r}: cannot import {module_name!r} ({type(error).__name__}: {detail})") \
            from None
    for attribute in attributes.split("."):
        try:
            found = getattr(found, attribute)
        except AttributeError:
            raise ValueError(f"{key} = {path!r}: module {module_name!r} has no {attributes!r}") from None
    return found


def import_path_of(obj: Any) -> str | None:
    """The path that imports ``obj`` itself (a function or class of an importable module), else None."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(name, str) or module == "__main__":
        return None
    path = f"{module}:{name}"
    if not is_import_path(path):  # a lambda, a function defined inside another
        return None
    try:
        return path if load(path, "") is obj else None
    except ValueError:
        return None


def call_with_named(factory: Callable[..., Any], **offered: Any) -> Any:
    """Calls ``factory`` with those of ``offered`` its signature names as parameters.

    A model factory may take ``num_classes`` or ``input_dim``, both or neither; what a
    ``**kwargs`` would swallow is not passed, as it may not be the factory's own.
    """
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return factory()
    named = {p.name for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                      inspect.Parameter.KEYWORD_ONLY)}
    return factory(**{key: value for key, value in offered.items() if key in named})
