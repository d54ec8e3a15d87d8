"""A byte-level pushdown recognizer for the JSON text a compiled schema (json_schema.Node) allows.

A *stack* is a cons list `(frame, parent_stack)` with `None` at the bottom (the value is finished);
a *frame* is a small tuple whose first item says what it is reading:

    (VAL, node, ws, depth)                     a value of `node` comes next (after <= MAX_WS spaces)
    (OBJ, node, phase, idx, ws, valnode, depth) inside an object; idx = declared keys behind us
    (KEY, cands, pos)                          inside a declared key: cands = ((name, prop index), ...)
    (STR, spec, count, u8, esc, live)          inside a string: count characters so far, u8 = pending
                                               UTF-8 state, esc = escape state, live = the prefix of an
                                               excluded key name that the string still spells (or None)
    (NUM, integer, phase, digits)              inside a number
    (BND, integer, bounds, phase, neg, value, frac, digits)   inside a number with bounds: the digits so far
                                               read as value / 10**frac; only prefixes that can still end
                                               inside the bounds are allowed (no exponent)
    (LIT, choices, pos)                        inside one of some JSON-encoded literals (enum, true, null)
    (ARR, node, phase, count, ws, depth)       inside an array with count items so far

Everything is immutable and hashable, so constrain.py caches token masks by stack. anyOf makes the
recognizer nondeterministic: a *config* is a tuple of the stacks still alive (usually one).

Bounds on the output form, so a model cannot loop forever inside one token class: at most one space or
newline per gap (MAX_WS), MAX_INT_DIGITS / MAX_FRAC_DIGITS / MAX_EXP_DIGITS digits in a number,
nesting at most MAX_DEPTH; string lengths are bounded in json_schema (MAX_STRING, MAX_KEY).
"""

from __future__ import annotations

from fractions import Fraction

from corral.engine.json_schema import K_ARRAY, K_LITERAL, K_NUMBER, K_OBJECT, K_STRING, K_UNION, Node

MAX_WS = 1
"""Whitespace bytes allowed in one gap between tokens, a space or a newline (IS_WS): runs of blank lines,
tabs or indentation only spend the model's tokens, and small models would write them until max_tokens."""
MAX_INT_DIGITS, MAX_FRAC_DIGITS, MAX_EXP_DIGITS = 20, 20, 3
"""Digits per part of a number: room for any int64 and for every float Python's repr writes."""
MAX_DEPTH = 20
"""Nesting of objects and arrays; at the limit a value can no longer open a container."""

STR, VAL, OBJ, NUM, LIT, KEY, ARR, BND = range(8)  # frame kinds, the commonest first
P_OPEN, P_KEY, P_COLON, P_AFTER = range(4)  # object phases: after "{", after ",", after a key, after a value
A_FIRST, A_AFTER = range(2)  # array phases: after "[", after an item
N_NEG, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)  # number phases
ACCEPTING = frozenset({N_ZERO, N_INT, N_FRAC, N_EXP})
NUM_LIMIT = {N_INT: MAX_INT_DIGITS, N_FRAC: MAX_FRAC_DIGITS, N_EXP: MAX_EXP_DIGITS}

IS_WS = tuple(b in b" \n" for b in range(256))  # JSON also allows \t and \r; the model need not write them
IS_HEX = tuple(b in b"0123456789abcdefABCDEF" for b in range(256))
SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')

# UTF-8 inside strings (Unicode table 3-7: no overlongs, no surrogates, nothing past U+10FFFF).
# u8 state = (continuation bytes still due, range of the next one); 0 = none due.
U8_RANGE = (None, (0x80, 0xBF), (0xA0, 0xBF), (0x80, 0xBF), (0x80, 0x9F), (0x90, 0xBF), (0x80, 0xBF), (0x80, 0x8F))
U8_DUE = (0, 1, 2, 2, 2, 3, 3, 3)
U8_NEXT = (0, 0, 1, 1, 1, 3, 3, 3)
U8_LEAD = tuple(
    1 if 0xC2 <= b <= 0xDF else 2 if b == 0xE0 else 4 if b == 0xED else 3 if 0xE1 <= b <= 0xEF
    else 5 if b == 0xF0 else 6 if 0xF1 <= b <= 0xF3 else 7 if b == 0xF4 else 0
    for b in range(256)
)

Stack = tuple | None
Config = tuple


def initial(root: Node) -> Config:
    return (((VAL, root, 0, 0), None),)


def step(stack: Stack, b: int, out: list) -> None:
    """Append to out every stack that `stack` becomes after reading byte b (none: b is not allowed)."""
    if stack is None:
        return
    f, parent = stack
    k = f[0]
    if k == STR:
        _string(f, parent, b, out)
    elif k == VAL:
        if not IS_WS[b]:
            _start(f[1], b, parent, f[3], out)
        elif f[2] < MAX_WS:
            out.append(((VAL, f[1], f[2] + 1, f[3]), parent))
    elif k == OBJ:
        _object(f, parent, b, out)
    elif k == NUM:
        _number(f, parent, b, out)
    elif k == LIT:
        _literal(f, parent, b, out)
    elif k == KEY:
        _key(f, parent, b, out)
    elif k == BND:
        _bounded(f, parent, b, out)
    else:
        _array(f, parent, b, out)


def step_config(config: Config, b: int) -> Config:
    out: list = []
    for stack in config:
        step(stack, b, out)
    return tuple(dict.fromkeys(out)) if len(out) > 1 else tuple(out)


def feed(config: Config, data: bytes) -> Config:
    """The config after all of data; () if data is not allowed."""
    for b in data:
        config = step_config(config, b)
        if not config:
            break
    return config


def can_end(config: Config) -> bool:
    """Whether the bytes so far are a whole value (a number or literal may end here without a closing byte)."""
    for stack in config:
        while stack is not None:
            f = stack[0]
            if (f[0] == NUM and f[2] in ACCEPTING or f[0] == LIT and any(len(c) == f[2] for c in f[1])
                    or f[0] == BND and _bounded_ends(f)):
                stack = stack[1]
            else:
                break
        if stack is None:
            return True
    return False


def _start(node: Node, b: int, parent: Stack, depth: int, out: list) -> None:
    """A value of node starts with byte b (not whitespace)."""
    kind = node.kind
    if kind == K_UNION:
        for alt in node.alts:
            _start(alt, b, parent, depth, out)
    elif kind == K_STRING:
        if b == 0x22:
            out.append(((STR, node.spec, 0, 0, 0, None), parent))
    elif kind == K_OBJECT:
        if b == 0x7B and depth < MAX_DEPTH:
            out.append(((OBJ, node, P_OPEN, 0, 0, None, depth + 1), parent))
    elif kind == K_NUMBER and node.bounds is not None:
        if b == 0x2D:
            _push_bounded((BND, node.integer, node.bounds, N_NEG, True, 0, 0, 0), parent, out)
        elif 0x30 <= b <= 0x39:
            _push_bounded((BND, node.integer, node.bounds, N_ZERO if b == 0x30 else N_INT, False, b - 0x30, 0, 1),
                          parent, out)
    elif kind == K_NUMBER:
        if b == 0x2D:
            out.append(((NUM, node.integer, N_NEG, 0), parent))
        elif b == 0x30:
            out.append(((NUM, node.integer, N_ZERO, 1), parent))
        elif 0x31 <= b <= 0x39:
            out.append(((NUM, node.integer, N_INT, 1), parent))
    elif kind == K_LITERAL:
        choices = node.by_first.get(b)
        if choices:
            out.append(((LIT, choices, 1), parent))
    elif kind == K_ARRAY:
        if b == 0x5B and depth < MAX_DEPTH:
            out.append(((ARR, node, A_FIRST, 0, 0, depth + 1), parent))


def _string(f: tuple, parent: Stack, b: int, out: list) -> None:
    _, spec, count, u8, esc, live = f
    if u8:  # inside a multi-byte character
        lo, hi = U8_RANGE[u8]
        if lo <= b <= hi:
            out.append(((STR, spec, count, U8_NEXT[u8], 0, _extend(spec, live, b)), parent))
        return
    if esc:
        esc = _escape(esc, b)
        if esc >= 0:
            out.append(((STR, spec, count, 0, esc, live), parent))
        return
    if b == 0x22:  # the closing quote
        if count >= spec.min and (live is None or live not in spec.exclude):
            out.append(parent)
        return
    if b < 0x20 or count >= spec.max:  # raw control characters are not JSON
        return
    if b == 0x5C:
        if not spec.key:  # free keys beside declared ones stay escape-free, so they can be checked against those names
            out.append(((STR, spec, count + 1, 0, 1, live), parent))
        return
    u8 = U8_LEAD[b] if b >= 0x80 else 0
    if b < 0x80 or u8:
        out.append(((STR, spec, count + 1, u8, 0, _extend(spec, live, b)), parent))


def _extend(spec, live: bytes | None, b: int) -> bytes | None:
    if live is None:
        return None
    live += bytes((b,))
    return live if live in spec.prefixes else None


def _escape(esc: int, b: int) -> int:
    """Next escape state: 1 after a backslash, 2..5 at the hex digits of \\uXXXX (6: second digit after a
    'd', which must not start a surrogate, so every escape is one whole character); -1 if b is wrong."""
    if esc == 1:
        return 0 if b in SIMPLE_ESCAPES else 2 if b == 0x75 else -1
    if not IS_HEX[b]:
        return -1
    if esc == 2:
        return 6 if b in (0x44, 0x64) else 3
    if esc == 6:
        return 4 if 0x30 <= b <= 0x37 else -1
    return 4 if esc == 3 else 5 if esc == 4 else 0


def _object(f: tuple, parent: Stack, b: int, out: list) -> None:
    _, node, phase, idx, ws, valnode, depth = f
    if IS_WS[b]:
        if ws < MAX_WS:
            out.append(((OBJ, node, phase, idx, ws + 1, valnode, depth), parent))
    elif phase == P_AFTER:
        if b == 0x2C and node.more_keys[idx]:
            out.append(((OBJ, node, P_KEY, idx, 0, None, depth), parent))
        elif b == 0x7D and not node.required_left[idx]:
            out.append(parent)
    elif phase == P_COLON:
        if b == 0x3A:
            out.append(((VAL, valnode, 0, depth), ((OBJ, node, P_AFTER, idx, 0, None, depth), parent)))
    elif b == 0x22:  # a key: one of the declared ones still allowed here, or (if allowed) a free one
        cands = node.cands[idx]
        if cands:
            out.append(((KEY, cands, 0), ((OBJ, node, P_COLON, idx, 0, None, depth), parent)))
        if node.extra is not None and not node.required_left[idx]:
            spec = node.key_spec
            after = ((OBJ, node, P_COLON, len(node.props), 0, node.extra, depth), parent)
            out.append(((STR, spec, 0, 0, 0, b"" if spec.exclude else None), after))
    elif b == 0x7D and phase == P_OPEN and not node.required_left[idx]:
        out.append(parent)


def _key(f: tuple, parent: Stack, b: int, out: list) -> None:
    _, cands, pos = f
    if b == 0x22:
        for name, j in cands:
            if len(name) == pos:
                obj, grand = parent
                out.append(((OBJ, obj[1], P_COLON, j + 1, 0, obj[1].props[j][1], obj[6]), grand))
    nxt = tuple(c for c in cands if len(c[0]) > pos and c[0][pos] == b)
    if nxt:
        out.append(((KEY, nxt, pos + 1), parent))


def _number(f: tuple, parent: Stack, b: int, out: list) -> None:
    _, integer, phase, n = f
    digit = 0x30 <= b <= 0x39
    if phase == N_NEG:
        if digit:
            out.append(((NUM, integer, N_ZERO if b == 0x30 else N_INT, 1), parent))
    elif phase == N_DOT or phase == N_ESIGN:
        if digit:
            out.append(((NUM, integer, N_FRAC if phase == N_DOT else N_EXP, 1), parent))
    elif phase == N_E:
        if digit:
            out.append(((NUM, integer, N_EXP, 1), parent))
        elif b == 0x2B or b == 0x2D:
            out.append(((NUM, integer, N_ESIGN, 0), parent))
    elif digit:  # no leading zeros; each part has its digit limit
        if phase != N_ZERO and n < NUM_LIMIT[phase]:
            out.append(((NUM, integer, phase, n + 1), parent))
    elif b == 0x2E and not integer and phase <= N_INT:
        out.append(((NUM, integer, N_DOT, 0), parent))
    elif (b == 0x65 or b == 0x45) and not integer and phase != N_EXP:
        out.append(((NUM, integer, N_E, 0), parent))
    else:  # the number is over; the byte belongs to what holds it
        step(parent, b, out)


def _bounded(f: tuple, parent: Stack, b: int, out: list) -> None:
    _, integer, bounds, phase, neg, value, frac, n = f
    if 0x30 <= b <= 0x39:
        d = b - 0x30
        if phase == N_NEG:
            _push_bounded((BND, integer, bounds, N_ZERO if d == 0 else N_INT, neg, d, 0, 1), parent, out)
        elif phase == N_DOT:
            _push_bounded((BND, integer, bounds, N_FRAC, neg, value * 10 + d, 1, 1), parent, out)
        elif phase == N_INT and n < MAX_INT_DIGITS or phase == N_FRAC and n < MAX_FRAC_DIGITS:
            _push_bounded((BND, integer, bounds, phase, neg, value * 10 + d, frac + (phase == N_FRAC), n + 1),
                          parent, out)
    elif b == 0x2E and not integer and phase in (N_ZERO, N_INT):
        _push_bounded((BND, integer, bounds, N_DOT, neg, value, 0, 0), parent, out)
    elif _bounded_ends(f):  # the number is over; the byte belongs to what holds it
        step(parent, b, out)


def _bounded_ends(f: tuple) -> bool:
    _, _, bounds, phase, neg, value, frac, _ = f
    return phase in ACCEPTING and bounds.holds(Fraction(-value if neg else value, 10**frac))


def _push_bounded(f: tuple, parent: Stack, out: list) -> None:
    """Append the frame when some number it may still become lies within its bounds."""
    _, integer, bounds, phase, neg, value, frac, n = f
    x = Fraction(value, 10**frac)
    if phase == N_NEG:  # "-": any magnitude
        spans = [(Fraction(0), None)]
    elif phase == N_FRAC or phase == N_DOT:  # x, or more digits: [x, x + 10**-frac)
        spans = [(x, x + Fraction(1, 10**frac))]
    elif phase == N_ZERO:  # 0, or 0.ddd
        spans = [(x, x)] if integer else [(x, x + 1)]
    else:  # v, v.ddd, or k more digits: [v * 10**k, (v + 1) * 10**k)
        spans = [(x, x) if integer else (x, x + 1)]
        spans += [(x * 10**k, (x + 1) * 10**k - (1 if integer else 0)) for k in range(1, MAX_INT_DIGITS - n + 1)]
    if any(_meets(bounds, lo, hi, neg, integer) for lo, hi in spans):
        out.append((f, parent))


def _meets(bounds, lo: Fraction, hi: Fraction | None, neg: bool, integer: bool) -> bool:
    """Whether a span of magnitudes (integers: [lo, hi]; numbers: [lo, hi), or {lo} when hi == lo; hi None =
    unbounded), negated when neg, holds a number inside bounds. Intervals are (low, low_in, high, high_in),
    None for an infinite end."""
    span = (lo, True, hi, integer or hi == lo)
    if neg:
        span = (None if hi is None else -hi, span[3], -lo, True)
    b_lo, lo_open, b_hi, hi_open = bounds
    low, low_in = _tighter((span[0], span[1]), (b_lo, not lo_open), max)
    high, high_in = _tighter((span[2], span[3]), (b_hi, not hi_open), min)
    if integer and low is not None:  # the smallest integer the low end lets in
        first = _ceil(low)
        low, low_in = (first + 1 if first == low and not low_in else first), True
    if low is None or high is None:
        return True
    return low < high or low == high and low_in and high_in


def _tighter(a: tuple, b: tuple, pick) -> tuple:
    """Of two interval ends (value or None = infinite, inclusive), the tighter: pick is max for low ends."""
    if a[0] is None or b[0] is None:
        return b if a[0] is None else a
    if a[0] == b[0]:
        return a[0], a[1] and b[1]
    return a if pick(a[0], b[0]) == a[0] else b


def _ceil(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


def _literal(f: tuple, parent: Stack, b: int, out: list) -> None:
    _, choices, pos = f
    nxt = tuple(c for c in choices if len(c) > pos and c[pos] == b)
    if nxt:
        out.append(((LIT, nxt, pos + 1), parent))
    if any(len(c) == pos for c in choices):  # a whole literal: the byte belongs to what holds it
        step(parent, b, out)


def _array(f: tuple, parent: Stack, b: int, out: list) -> None:
    _, node, phase, count, ws, depth = f
    if IS_WS[b]:
        if ws < MAX_WS:
            out.append(((ARR, node, phase, count, ws + 1, depth), parent))
    elif b == 0x5D:
        if count >= node.min_items:
            out.append(parent)
    elif phase == A_FIRST:
        if node.max_items is None or node.max_items >= 1:
            _start(node.items, b, ((ARR, node, A_AFTER, 1, 0, depth), parent), depth, out)
    elif b == 0x2C and (node.max_items is None or count < node.max_items):
        out.append(((VAL, node.items, 0, depth), ((ARR, node, A_AFTER, count + 1, 0, depth), parent)))
