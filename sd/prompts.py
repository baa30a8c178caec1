"""Prompts as AUTOMATIC1111's web UI (A1111 v1.10.1) reads them: pure text in, structure out.

The layers, applied in this order to a positive prompt (A1111's `prompt_parser.py` and `extra_networks.py`):

    "<lora:x:0.8> a [cat:dog:0.5] AND (a hat:1.2) BREAK night:0.7"
      extract_networks     -> text without the <kind:args> tags, and the tags        (positive prompt only)
      split_and            -> [(" a [cat:dog:0.5] ", 1.0), (" (a hat:1.2) BREAK night", 0.7)]
      prompt_schedule      -> per part, [(end_at_step, text), ...]: prompt editing and alternation resolved
      parse_attention      -> per text, [(piece, weight), ...] with ("BREAK", -1) markers

`parse_attention` and `prompt_schedule` are the public names other tools use; their results equal A1111's
`parse_prompt_attention` and `get_learned_conditioning_prompt_schedules` (as tuples instead of lists).
Turning the pieces into CLIP conditioning is `sd.conditioning`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import lark

# --- extra networks: <lora:name:te:unet>, <hypernet:name:w> -------------------------------------------

_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    """One `<kind:arg:arg...>` tag, e.g. `<lora:name:0.8>` -> kind "lora", args ("name", "0.8")."""

    kind: str
    args: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"<{self.kind}:{':'.join(self.args)}>"

    @property
    def name(self) -> str:
        return self.args[0]

    def positional(self) -> list[str]:
        return [a for a in self.args if len(a.split("=", 2)) != 2]

    def named(self) -> dict[str, str]:
        """`key=value` arguments (A1111 splits at most twice: "a=b=c" stays positional)."""
        return dict(parts for a in self.args if len(parts := a.split("=", 2)) == 2)


def extract_networks(prompt: str) -> tuple[str, list[NetworkTag]]:
    """The prompt with every `<kind:args>` tag removed (A1111 removes unknown kinds too), and the tags."""
    tags: list[NetworkTag] = []

    def take(match: re.Match[str]) -> str:
        tags.append(NetworkTag(match.group(1), tuple(match.group(2).split(":"))))
        return ""

    return _NETWORK_RE.sub(take, prompt), tags


def lora_multipliers(tag: NetworkTag, default: float = 1.0) -> tuple[float, float]:
    """(text encoder, U-Net) strengths of a `<lora:name:te:unet>` tag; the U-Net's defaults to te's, te's to
    `default` (A1111's extra_networks_default_multiplier). `te=` / `unet=` named forms win."""
    positional, named = tag.positional(), tag.named()
    try:
        te = float(named.get("te", positional[1] if len(positional) > 1 else default))
        unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
    except ValueError:
        raise ValueError(f"{tag.text}: strengths must be numbers") from None
    return te, unet


# --- composable prompts: "a cat :1.2 AND a dog" ----------------------------------------------------------

_AND_RE = re.compile(r"\bAND\b")
# A trailing ":number" is the part's weight, with or without AND. `(?:\s|.)` because "." skips newlines.
_PART_WEIGHT_RE = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The AND parts of a prompt with their weights (1.0 unless a part ends in ":w"); texts keep their
    surrounding spaces, as A1111's do (they are then tokenized, which strips them)."""
    parts = []
    for part in _AND_RE.split(prompt):
        match = _PART_WEIGHT_RE.search(part)
        text, weight = match.groups() if match else (part, None)
        parts.append((text, 1.0 if weight is None else float(weight)))
    return parts


# --- prompt editing and alternation: "[from:to:when]", "[a|b]" -------------------------------------------

# A1111's grammar (Earley, so ambiguous prompts resolve as A1111's do). Brackets that are not editing or
# alternation stay text, and a prompt that does not parse at all is taken literally.
_SCHEDULE_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@lru_cache(maxsize=1)
def _schedule_parser() -> lark.Lark:
    return lark.Lark(_SCHEDULE_GRAMMAR, maybe_placeholders=True)


def _switch_step(number: str, steps: int, int_offset: int, float_offset: float, old: bool) -> int:
    """The last step that still shows `from` in `[from:to:number]`."""
    value = float(number)
    if old:  # before v1.6: a value below 1 is a fraction, anything else a step
        value = value * steps if value < 1 else value
    elif "." in number:  # "0.5", "1.5" (hires: 1 + fraction of the hires pass)
        value = (value - float_offset) * steps
    else:
        value = value - int_offset
    return min(steps, int(value))


def _text_at(tree: lark.Tree | lark.Token | None, step: int, switch: dict[int, int]) -> str:
    """The prompt text shown at `step` (1-based), every edit and alternation resolved."""
    if tree is None:
        return ""
    if isinstance(tree, lark.Token):
        return str(tree)
    children = tree.children
    if tree.data == "scheduled":
        before, after = children[0], children[1]
        return _text_at(before if step <= switch[id(tree)] else after, step, switch)
    if tree.data == "alternate":
        return _text_at(children[(step - 1) % len(children)], step, switch)
    return "".join(_text_at(child, step, switch) for child in children)


def prompt_schedule(
    text: str, steps: int, *, hires_steps: int | None = None, old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """A1111's schedule of one prompt: [(end_at_step, text), ...], each text used up to and including its
    step (model calls 0..end_at_step, as A1111 counts them). `steps` is the sampler's total (A1111 doubles it
    for second-order samplers). With `hires_steps`, the schedule of the hires pass: integer switch points
    count on from the first pass's `steps`, fractions above 1 are fractions of the hires pass.

    >>> prompt_schedule("a [cat:dog:0.5]", 20)
    [(10, 'a cat'), (20, 'a dog')]
    """
    if hires_steps is not None and not old_scheduling:
        int_offset, float_offset, total = steps, 1.0, hires_steps
    else:
        int_offset, float_offset, total = 0, 0.0, steps
    try:
        tree = _schedule_parser().parse(text)
    except lark.exceptions.LarkError:
        return [(total, text)]
    boundaries = {total}
    switch: dict[int, int] = {}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            when = _switch_step(str(node.children[-2]), total, int_offset, float_offset, old_scheduling)
            switch[id(node)] = when
            if when >= 1:
                boundaries.add(when)
        elif node.data == "alternate":
            boundaries.update(range(1, total + 1))
    return [(step, _text_at(tree, step, switch)) for step in sorted(boundaries)]


def schedule_index(ends: Sequence[int], call: int) -> int:
    """Which entry of a schedule with these end_at_steps model call `call` (0-based) uses: the first that
    ends at or after it, else the last (A1111's reconstruct_cond_batch, off-by-one included: `[cat:dog:10]`
    shows cat for calls 0..10, eleven calls)."""
    for index, end_at_step in enumerate(ends):
        if call <= end_at_step:
            return index
    return len(ends) - 1


# --- emphasis: "(x)", "[x]", "(x:1.3)", escapes, BREAK ---------------------------------------------------

_ATTENTION_RE = re.compile(
    r"""
    \\[()\[\]\\]            # an escaped bracket or backslash: the character itself
  | \\                      # a lone backslash: dropped
  | [(\[]                   # openers
  | :\s*([+-]?[.\d]+)\s*\)  # ":1.3)" closes "(" with that weight
  | [)\]]                   # closers (plain text when nothing is open)
  | [^\\()\[\]:]+           # text
  | :                       # a colon that is not a weight
    """,
    re.X,
)
_BREAK_RE = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """A1111's `parse_prompt_attention`: the text as (piece, weight) pairs, ("BREAK", -1.0) between chunks.

    `(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:1.3)` multiplies by 1.3, nested brackets multiply,
    unclosed ones apply to the end, `\\(` is a literal bracket. Neighbours of exactly equal weight merge
    into one piece (so `(a:1.1)(b:1.1)` is the one word "ab"). BREAK inside brackets gets their weight and
    is then just the word "break" (A1111's behaviour).

    >>> parse_attention("a (cat:1.3) and [dog]")
    [('a ', 1.0), ('cat', 1.3), (' and ', 1.0), ('dog', 0.9090909090909091)]
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION_RE.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt: {weight!r} in {token!r} is not a number") from None
            multiply(round_open.pop(), factor)
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_RE.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in round_open:
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


def check_prompt(text: str, steps: int = 1) -> None:
    """ValueError (one line) for a prompt A1111 cannot read, before any model work: today only a weight
    such as `(x:1.2.3)`, which A1111's grammar accepts and then fails on."""
    for part, _ in split_and(extract_networks(text)[0]):
        for _, variant in prompt_schedule(part, steps):
            parse_attention(variant)


def is_break(piece: tuple[str, float]) -> bool:
    return piece[0] == BREAK[0] and piece[1] == BREAK[1]


__all__ = [
    "NetworkTag",
    "check_prompt",
    "extract_networks",
    "is_break",
    "lora_multipliers",
    "parse_attention",
    "prompt_schedule",
    "schedule_index",
    "split_and",
]
