"""Output helpers shared by the commands: plain tables and JSON on stdout."""

from __future__ import annotations

import json
from collections.abc import Sequence


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Format rows as a plain fixed-width table (numbers right-aligned)."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    lines = [fmt(list(headers)), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """``"1 point"``, ``"3 points"``: a number with its noun in the right form."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


def _fmt(value: object, digits: int = 4) -> object:
    return f"{value:.{digits}f}" if isinstance(value, float) else value


def _is_main() -> bool:
    """Whether this process prints and writes the results (rank 0 under torchrun)."""
    from featlab.distributed import info_from_env

    return info_from_env().is_main

