"""One hypothesis strategy for byte-level mutations of a small valid file (RELIABILITY.md 10)."""

from hypothesis import strategies as st


@st.composite
def mutated_bytes(draw, base: bytes, hot_end: int | None = None) -> bytes:
    """1-4 edits (set, insert, delete, truncate); half of them land before hot_end (the header), if given."""
    data = bytearray(base)
    hot_end = len(base) if hot_end is None else hot_end
    for _ in range(draw(st.integers(1, 4))):
        end = hot_end if draw(st.booleans()) or len(data) <= hot_end else len(data)
        kind = draw(st.sampled_from(["set", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, min(end, len(data)) - 1)))
        if kind == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        else:
            del data[pos:]
    return bytes(data)
