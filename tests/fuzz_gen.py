"""Fast seeded inputs for the decoder fuzzers.

Hypothesis spends ~5-10 ms of its own machinery per example on this box (a
msgpack decode costs microseconds), so 10,000 examples took a minute per
fuzzer. :class:`Gen` builds the same kinds of values (msgpack scalars at their
boundaries, nested lists and maps, random bytes) from ``random.Random``, and
:func:`fuzz` runs a check over 10,000 of them in a few seconds. Each input has
its own seed, so a failure names the seed and the input, and
``Gen(seed)`` rebuilds it. The hypothesis versions stay (with fewer examples)
for their shrinking and their own idea of edge cases.
"""

from __future__ import annotations

import os
import random
import struct
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Set to explore beyond the fixed inputs (the default keeps every run identical, so failures reproduce).
BASE_SEED = int(os.environ.get("DIST_CKPT_FUZZ_SEED", "0"))

# Integers msgpack encodes differently on either side of.
_INT_EDGES = [0, 1, -1, 2**7 - 1, 2**7, 2**8 - 1, 2**8, 2**15 - 1, 2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32]
_INT_EDGES += [2**63 - 1, 2**63, 2**64 - 1, -(2**5), -(2**5) - 1, -(2**7), -(2**7) - 1, -(2**15) - 1, -(2**31), -(2**31) - 1, -(2**63)]
_FLOAT_EDGES = [0.0, -0.0, 1.0, -1.5, float("inf"), float("-inf"), float("nan"), 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e-7, 3.4e38]
# Bytes that mean something to msgpack (nil, never-used, bin/str/array/map headers), to be spliced into random bytes.
_MSGPACK_BYTES = bytes([0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x80, 0x91, 0x81, 0xA0, 0xFF, 0x00])


class Gen(random.Random):
    """A seeded source of fuzz inputs (the kinds of values the hypothesis strategies drew).

    A fuzzer of another format subclasses it and sets its own integer edges and odds.
    """

    INT_EDGES = _INT_EDGES
    INT_ODDS = (0.3, 0.6)  # below the first: an edge (+-1); below the second: a small int; else any bit length
    SMALL_INTS = (-20, 20)

    def size(self, max_size: int) -> int:
        """A length in ``0..max_size``, small ones (and the limit itself) more often, as hypothesis draws them."""
        r = self.random()
        if r < 0.1:
            return 0
        if r < 0.2:
            return max_size
        return min(max_size, int(self.expovariate(1 / max(1.0, max_size / 4))))

    def integer(self, lo: int = -(2**63), hi: int = 2**64 - 1) -> int:
        """An integer in ``lo..hi``: msgpack's encoding edges, small ones, or any bit length."""
        r = self.random()
        if r < self.INT_ODDS[0]:
            v = self.choice(self.INT_EDGES) + self.randint(-1, 1)
        elif r < self.INT_ODDS[1]:
            v = self.randint(*self.SMALL_INTS)
        else:
            v = self.getrandbits(self.randint(1, 64)) * self.choice((1, -1))
        return min(hi, max(lo, v))

    def floating(self) -> float:
        """A float: an edge (nan, infinities, -0.0, subnormals), a random bit pattern, or an ordinary value."""
        r = self.random()
        if r < 0.3:
            return self.choice(_FLOAT_EDGES)
        if r < 0.6:
            return float(struct.unpack("<d", self.getrandbits(64).to_bytes(8, "little"))[0])
        return self.uniform(-1e6, 1e6)

    def text(self, max_size: int) -> str:
        """A string of ASCII, other BMP and astral characters (never surrogates, which cannot be UTF-8)."""
        chars = []
        for _ in range(self.size(max_size)):
            r = self.random()
            if r < 0.6:
                chars.append(chr(self.randint(0, 127)))
            elif r < 0.9:
                c = self.randint(128, 0xFFFF)
                chars.append(chr(c if not 0xD800 <= c <= 0xDFFF else c - 0x800))
            else:
                chars.append(chr(self.randint(0x10000, 0x10FFFF)))
        return "".join(chars)

    def binary(self, max_size: int) -> bytes:
        """Random bytes, some runs of one byte, some spliced with msgpack type bytes."""
        n = self.size(max_size)
        r = self.random()
        if r < 0.15:
            return bytes([self.randint(0, 255)]) * n
        data = bytearray(self.getrandbits(8 * n).to_bytes(n, "little")) if n else bytearray()
        if r < 0.5:
            for _ in range(self.randint(0, max(0, n // 4))):
                data[self.randrange(n)] = self.choice(_MSGPACK_BYTES)
        return bytes(data)

    def scalar(self, text_max: int = 8, binary_max: int = 8) -> object:
        """None, a bool, an integer (int64/uint64 range), a float, a string or bytes."""
        kind = self.randrange(6)
        if kind == 0:
            return None
        if kind == 1:
            return self.random() < 0.5
        if kind == 2:
            return self.integer()
        if kind == 3:
            return self.floating()
        return self.text(text_max) if kind == 4 else self.binary(binary_max)

    def value(self, max_leaves: int, max_items: int, key: Callable[[], object], leaf: Callable[[], object] | None = None) -> object:
        """A nested value of lists and maps (``key()`` makes map keys) with at most ``max_leaves`` leaves."""
        budget = [self.randint(1, max_leaves)]
        return self._nested(budget, max_items, key, leaf or self.scalar)

    def _nested(self, budget: list[int], max_items: int, key: Callable[[], object], leaf: Callable[[], object]) -> object:
        if budget[0] <= 1 or self.random() < 0.4:
            budget[0] -= 1
            return leaf()
        n = self.randint(0, max_items)
        if self.random() < 0.5:
            return [self._nested(budget, max_items, key, leaf) for _ in range(n) if budget[0] > 0]
        return {key(): self._nested(budget, max_items, key, leaf) for _ in range(n) if budget[0] > 0}

    def mutate(self, blob: bytes, max_changes: int) -> bytes:
        """``blob`` with 1..``max_changes`` bytes set to random values."""
        out = bytearray(blob)
        for _ in range(self.randint(1, max_changes)):
            out[self.randrange(len(out))] = self.randint(0, 255)
        return bytes(out)


def fuzz(name: str, make: Callable[[Gen], T], check: Callable[[T], Any], n: int = 10_000) -> None:
    """Run ``check(make(Gen(seed)))`` for ``n`` fixed seeds; fail naming the seed and the input.

    Args:
        name: the fuzzer's name (part of each seed, so fuzzers do not share inputs).
        make: builds one input from a seeded generator.
        check: raises on a bad outcome (it catches the decoder's expected errors itself).
        n: how many inputs.

    Raises:
        AssertionError: ``check`` raised for some input (chained to its exception).
    """
    base = BASE_SEED * 1_000_000 + sum(map(ord, name)) * 100_000
    for i in range(n):
        seed = base + i
        case = make(Gen(seed))
        try:
            check(case)
        except Exception as e:  # any escape (KeyError, RecursionError, a failed assert) is what a fuzzer is for
            raise AssertionError(f"fuzzer {name}: input {i} (Gen({seed})) failed with {type(e).__name__}: {e}\ninput: {case!r:.2000}") from e
