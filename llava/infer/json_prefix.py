"""A character-level recogniser of JSON-object prefixes, for `response_format: json_object`.

Constrained decoding needs one question answered for every candidate token: can the answer so far
plus this token's text still be completed into a JSON object? The state after each character is a
small immutable tuple (open containers, what is expected next, a buffer), so trying a candidate
costs a few dictionary-free steps and no copying. `DONE` means the top-level object is closed.
"""

from __future__ import annotations

import re

_WS = " \t\n\r"
_NUMBER_PREFIX = re.compile(r"-?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?(?:(?<=[0-9])[eE][+-]?[0-9]*)?)?")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_ESCAPES = set('"\\/bfnrtu')
_HEX = set("0123456789abcdefABCDEF")

State = tuple[tuple[str, ...], str, str]  # (open containers, mode, buffer)
START: State = ((), "start", "")
DONE = "done"


def _after_value(stack: tuple[str, ...]) -> State:
    return (stack, DONE if not stack else "comma_or_end", "")


def _string_char(state: State, ch: str) -> State | None:
    stack, mode, buf = state
    base = mode.split("_", 1)[0]  # "str" or "key"
    if mode.endswith("_u"):
        if ch not in _HEX:
            return None
        return (stack, base, "") if len(buf) == 3 else (stack, mode, buf + ch)
    if mode.endswith("_esc"):
        if ch not in _ESCAPES:
            return None
        return (stack, base + "_u", "") if ch == "u" else (stack, base, "")
    if ch == '"':
        return (stack, "colon", "") if base == "key" else _after_value(stack)
    if ch == "\\":
        return (stack, base + "_esc", "")
    return None if ord(ch) < 0x20 else state


def _value_start(stack: tuple[str, ...], ch: str) -> State | None:
    if ch == "{":
        return (stack + ("{",), "key_or_end", "")
    if ch == "[":
        return (stack + ("[",), "value_or_end", "")
    if ch == '"':
        return (stack, "str", "")
    if ch in "-0123456789":
        return (stack, "num", ch)
    if ch in _LITERALS:
        return (stack, "lit", _LITERALS[ch])
    return None


def _close(stack: tuple[str, ...], ch: str) -> State | None:
    if not stack or {"}": "{", "]": "["}.get(ch) != stack[-1]:
        return None
    return _after_value(stack[:-1])


def feed(state: State, ch: str) -> State | None:
    """The state after `ch`, or None when no JSON object starts with the text so far plus `ch`."""
    stack, mode, buf = state
    if mode.startswith(("str", "key")) and mode != "key_or_end":
        return _string_char(state, ch)
    if mode == "num":
        if _NUMBER_PREFIX.fullmatch(buf + ch):
            return (stack, "num", buf + ch)
        return feed(_after_value(stack), ch) if _NUMBER.fullmatch(buf) else None
    if mode == "lit":
        if ch != buf[0]:
            return None
        return (stack, "lit", buf[1:]) if len(buf) > 1 else _after_value(stack)
    if ch in _WS:
        return state
    if mode == "start":
        return (("{",), "key_or_end", "") if ch == "{" else None
    if mode == "value":
        return _value_start(stack, ch)
    if mode == "value_or_end":
        return _close(stack, ch) if ch == "]" else _value_start(stack, ch)
    if mode == "key_or_end":
        return _close(stack, ch) if ch == "}" else ((stack, "key", "") if ch == '"' else None)
    if mode == "expect_key":
        return (stack, "key", "") if ch == '"' else None
    if mode == "colon":
        return (stack, "value", "") if ch == ":" else None
    if mode == "comma_or_end":
        if ch == ",":
            return (stack, "expect_key", "") if stack[-1] == "{" else (stack, "value", "")
        return _close(stack, ch)
    return None  # DONE: nothing but whitespace may follow


def feed_text(state: State, text: str) -> State | None:
    for ch in text:
        next_state = feed(state, ch)
        if next_state is None:
            return None
        state = next_state
    return state


def closing_cost(state: State) -> int:
    """Characters still needed, at least, to close the object from `state` (a token adds >= 1)."""
    stack, mode, buf = state
    closers = len(stack)
    if mode.startswith("key") and mode != "key_or_end":
        return 3 + closers + (len(buf) if mode.endswith("_u") else 0)  # '"', ':', '0'
    if mode.startswith("str"):
        return 1 + closers + (4 - len(buf) if mode.endswith("_u") else 0)
    if mode == "num":
        return closers + (0 if _NUMBER.fullmatch(buf) else 1)
    if mode == "lit":
        return len(buf) + closers
    extra = {"start": 2, "value": 1, "expect_key": 4, "colon": 2}.get(mode, 0)
    return extra + closers
