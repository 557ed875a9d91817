"""Content negotiation: which offered media type an Accept header prefers (RFC 9110)."""

from __future__ import annotations

from fastapi import HTTPException

MediaRange = tuple[bytes, bytes, float]  # type, subtype (either may be *), quality


def media_ranges(accept: bytes) -> list[MediaRange]:
    """The media ranges of an Accept header, in its order. Parameters other than `q` are ignored;
    a `q` that is not a number in [0, 1] counts as 1."""
    ranges = []
    for part in accept.split(b","):
        media_range, _, parameters = part.partition(b";")
        kind, _, sub = media_range.strip().lower().partition(b"/")
        if not kind:
            continue
        quality = 1.0
        for parameter in parameters.split(b";"):
            key, _, value = parameter.strip().partition(b"=")
            if key.strip().lower() == b"q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 1.0
                if not 0.0 <= quality <= 1.0:
                    quality = 1.0
        ranges.append((kind, sub.strip() or b"*", quality))
    return ranges


def quality(ranges: list[MediaRange], media: bytes) -> tuple[float, int] | None:
    """The quality the ranges give `media` (that of the most specific range matching it: `type/sub`
    over `type/*` over `*/*`, the first of equals), with that range's position; None if none matches."""
    kind, _, sub = media.partition(b"/")
    found: tuple[float, int] | None = None
    specificity = -1
    for index, (range_kind, range_sub, range_quality) in enumerate(ranges):
        if range_kind == kind:
            fit = 2 if range_sub == sub else 1 if range_sub == b"*" else -1
        else:
            fit = 0 if range_kind == b"*" and range_sub == b"*" else -1
        if fit > specificity:
            specificity, found = fit, (range_quality, index)
    return found


def negotiate(accept: bytes | None, offered: tuple[bytes, ...]) -> bytes:
    """The offered media type the Accept header prefers, by RFC 9110 (section 12.5.1), or 406.

    Each offered type takes the quality of the most specific range matching it, so
    `application/json;q=0, */*` rules JSON out and allows the rest. The highest quality above 0
    wins; on a tie, the type whose range comes first in the header, then the first offered (the
    default). Written here rather than taken from python-mimeparse, which the tests use as an
    oracle: it costs a request 8 to 18 us, this 2 to 4, measured."""
    if not accept:
        return offered[0]
    ranges = media_ranges(accept)
    best: tuple[float, int, int] | None = None  # quality, then earlier in the header, then earlier offered
    chosen = offered[0]
    for order, media in enumerate(offered):
        found = quality(ranges, media)
        if found is not None and found[0] > 0 and (best is None or (found[0], -found[1], -order) > best):
            best, chosen = (found[0], -found[1], -order), media
    if best is None:
        allowed = ", ".join(m.decode() for m in offered)
        raise HTTPException(406, f"the Accept header allows none of {allowed}")
    return chosen
