"""Training lengths as OpenLTH-style step strings: '500it', '40ep', '2ep30it', or a plain int."""

from __future__ import annotations

import re

_STEP = re.compile(r"^\s*(?:(\d+)\s*ep)?\s*(?:(\d+)\s*it)?\s*$")


def parse(value: str | int, steps_per_epoch: int, *, name: str = "steps") -> int:
    """Iterations for `value`: an int, 'Nit', 'Nep' or 'NepMit' (one epoch = steps_per_epoch its)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected an int or a string like '500it', '40ep', '2ep30it'")
    if isinstance(value, int):
        its = value
    else:
        m = _STEP.match(str(value)) if isinstance(value, str) else None
        if m is None or (m.group(1) is None and m.group(2) is None):
            raise ValueError(f"{name}={value!r}: expected an int or a string like "
                             f"'500it', '40ep', '2ep30it'")
        its = int(m.group(1) or 0) * steps_per_epoch + int(m.group(2) or 0)
    if its < 0:
        raise ValueError(f"{name}={value!r}: must be >= 0 iterations")
    return its


def format(its: int, steps_per_epoch: int) -> str:  # noqa: A001 - mirrors parse
    """'2ep30it' for 2 * steps_per_epoch + 30 iterations."""
    ep, it = divmod(int(its), steps_per_epoch)
    return (f"{ep}ep" if ep else "") + (f"{it}it" if it or not ep else "")
