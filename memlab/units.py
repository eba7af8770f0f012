"""Byte counts for people and from people, with one meaning of every suffix.

Sizes are binary, as memory is: K, M, G, T and KiB, MiB, GiB, TiB are powers
of 1024 (`--ram 64G`, `--budget 64G` and `run.budget="64GiB"` are the same
bytes). Only the SI spellings kB, MB, GB, TB (any case) mean powers of 1000,
for a size copied from a disk's or a vendor's sheet. Standard library only.
"""
import re

from .errors import InputError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

# suffix (lower case) -> bytes; "" is a bare number, counted in the caller's unit
SUFFIXES = {
    "b": 1,
    "k": KiB, "kib": KiB, "kb": 10**3,
    "m": MiB, "mib": MiB, "mb": 10**6,
    "g": GiB, "gib": GiB, "gb": 10**9,
    "t": TiB, "tib": TiB, "tb": 10**12,
}
UNIT_BYTES = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB}
_SIZE = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*")


def parse_bytes(text, unit=1):
    """'6GiB', '512 MB', '1.5g', 2**30 -> bytes (an int). A bare number counts
    `unit` bytes: bytes by default, GiB for the CLI's --ram. InputError (a
    ValueError) with the reason otherwise."""
    if isinstance(text, bool):
        raise InputError("must be a size such as '6GiB', not a boolean")
    if isinstance(text, (int, float)):
        value = float(text) * unit
    else:
        match = _SIZE.fullmatch(str(text))
        suffix = match.group(2).lower() if match else None
        if suffix is None or suffix and suffix not in SUFFIXES:
            names = {size: name for name, size in UNIT_BYTES.items()}
            bare = "a number of bytes" if unit == 1 else f"a number of {names.get(unit, f'{unit}-byte units')}"
            raise InputError(f"must be a size such as '6GiB', '512MB' or {bare}")
        value = float(match.group(1)) * (SUFFIXES[suffix] if suffix else unit)
    if value != value or value <= 0 or value == float("inf"):
        raise InputError("must be a positive size")
    return int(value)


def format_bytes(n, smallest="B"):
    """One byte count for people: GiB (two decimals), MiB, KiB (one) or B,
    the largest unit it reaches but none below `smallest` ("MiB": 0.5 MiB, not
    512.0 KiB). None is a dash."""
    if n is None:
        return "–"
    n = int(n)
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB or smallest == "MiB":
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= KiB or smallest == "KiB":
        return f"{n / KiB:.1f} KiB"
    return f"{n} B"


def format_in(n, unit="MiB", digits=1):
    """A byte count in one fixed unit: format_in(3 << 20) == '3.0 MiB'."""
    return f"{n / UNIT_BYTES[unit]:.{digits}f} {unit}"


def bytes_unit(max_bytes):
    """(divisor, unit) for a chart axis: GiB when the largest value reaches 1 GiB, else MiB."""
    if max_bytes is not None and max_bytes >= GiB:
        return GiB, "GiB"
    return MiB, "MiB"
