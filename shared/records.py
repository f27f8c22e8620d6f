"""The contract's frozen records, built on the request path without their ``__init__`` (compiled).

A :class:`~mxward.shared.plugin.Transaction`, a :class:`~mxward.shared.plugin.Result` and a
:class:`~mxward.shared.plugin.Decision` are made for every policy request. Their ``__init__``
is interpreted Python (``plugin._quick_init``): about a fifth of a greylisting request's
instructions went into building these three. :func:`assemble` gives the compiled callers the
same object from a dict that names every field, at a fraction of that cost. A dict that does not
name every field is refused, so a field added to a record cannot be forgotten silently
(tests/shared/test_records.py compares each caller's records with the constructor's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["assemble"]

_T = TypeVar("_T")
_SIZES: dict[type, int] = {}


def assemble(cls: type[_T], fields: dict[str, Any]) -> _T:
    """An instance of the frozen dataclass ``cls`` whose fields are ``fields`` (all of them)."""
    size = _SIZES.get(cls)
    if size is None:
        size = _SIZES[cls] = len(dataclasses.fields(cls))  # type: ignore[arg-type]
    if len(fields) != size:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        missing, unknown = sorted(names - fields.keys()), sorted(fields.keys() - names)
        raise TypeError(f"{cls.__name__}: fields missing {missing}, unknown {unknown}")
    obj: _T = object.__new__(cls)
    object.__setattr__(obj, "__dict__", fields)
    return obj
