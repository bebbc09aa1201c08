"""Reading log2 histograms (bucket i holds values in [2^i, 2^(i+1)); bucket 0 also holds 0)."""

from __future__ import annotations

from collections.abc import Sequence


def bucket_bounds(i: int) -> tuple[int, int]:
    return (0 if i == 0 else 1 << i), (1 << (i + 1)) - 1


def quantile(counts: Sequence[int], q: float) -> float | None:
    """Estimated q-quantile, interpolating linearly inside the bucket; None for an empty histogram."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            lo, hi = bucket_bounds(i)
            return lo + (hi + 1 - lo) * max(0.0, rank - seen) / n
        seen += n
    lo, hi = bucket_bounds(len(counts) - 1)
    return float(hi)


def render(counts: Sequence[int], unit: str, width: int = 40) -> str:
    """bcc-style text rendering (print_log2_hist)."""
    last = max((i for i, n in enumerate(counts) if n), default=-1)
    if last < 0:
        return f"  (no {unit} samples)"
    first = min(i for i, n in enumerate(counts) if n)
    peak = max(counts)
    lines = [f"{unit:>18} : count     distribution"]
    for i in range(first, last + 1):
        lo, hi = bucket_bounds(i)
        bar = "*" * (counts[i] * width // peak if peak else 0)
        lines.append(f"{lo:>10} -> {hi:<10}: {counts[i]:<9} |{bar:<{width}}|")
    return "\n".join(lines)
