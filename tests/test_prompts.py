"""sd.prompts: A1111 v1.10.1's prompt parsing, pinned to its own outputs.

Rows marked (spec) are the worked examples of ../shared/reference/a1111-semantics.md §a (printed by A1111's
code); rows marked (doctest) are A1111's own doctests; the rest follow from the same rules (each says why).
Weights are compared exactly: A1111's float products (1.1 * 1.1 = 1.2100000000000002) are part of the result.
"""

from __future__ import annotations

import pytest

from sd.prompts import (
    NetworkTag,
    extract_networks,
    lora_multipliers,
    parse_attention,
    prompt_schedule,
    schedule_index,
    split_and,
)

R, S = 1.1, 1 / 1.1

ATTENTION = [
    # (spec)
    ("a (cat)", [("a ", 1.0), ("cat", 1.1)]),
    ("a ((cat))", [("a ", 1.0), ("cat", 1.2100000000000002)]),
    ("a [cat]", [("a ", 1.0), ("cat", 0.9090909090909091)]),
    ("[[cat]]", [("cat", 0.8264462809917354)]),
    ("a (cat:1.3) and (dog)", [("a ", 1.0), ("cat", 1.3), (" and ", 1.0), ("dog", 1.1)]),
    ("(a (b:1.5) c)", [("a ", 1.1), ("b", 1.6500000000000001), (" c", 1.1)]),
    ("[a (b) c]", [("a ", S), ("b", 1.0), (" c", S)]),
    ("a \\(cat\\)", [("a (cat)", 1.0)]),
    ("(cat", [("cat", 1.1)]),
    ("cat)", [("cat)", 1.0)]),
    ("(red, blue:1.2)", [("red, blue", 1.2)]),
    ("a (cat:1.1)(dog:1.1)", [("a ", 1.0), ("catdog", 1.1)]),
    ("(cat:1.3", [("cat:1.3", 1.1)]),
    ("(cat: 1.5 )", [("cat", 1.5)]),
    ("(cat:.5)", [("cat", 0.5)]),
    ("(cat:-1)", [("cat", -1.0)]),
    ("(y:0)", [("y", 0.0)]),
    ("(a:1e2)", [("a:1e2", 1.1)]),
    ("(a:b)", [("a:b", 1.1)]),
    ("a (b:1.5:2) c", [("a ", 1.0), ("b:1.5", 2.0), (" c", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("aBREAKb", [("aBREAKb", 1.0)]),
    ("a BREAKb", [("a BREAKb", 1.0)]),
    ("a break b", [("a break b", 1.0)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("(:1.5)", [("", 1.0)]),
    ("[]", [("", 1.0)]),
    ("a [b|c] d", [("a ", 1.0), ("b|c", S), (" d", 1.0)]),
    # (doctest)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
    # Escapes: a backslash before a bracket or backslash is that character; alone it is dropped.
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("\\[x\\]", [("[x]", 1.0)]),
    ("a\\b", [("ab", 1.0)]),
    ("(\\(x\\))", [("(x)", 1.1)]),
    # Nesting multiplies, and unclosed brackets close at the end in the order they were opened.
    ("((a) b", [("a", 1.2100000000000002), (" b", 1.1)]),
    ("[(a:2)]", [("a", 2 * S)]),
    ("(a [b] c:1.5)", [("a ", 1.5), ("b", S * 1.5), (" c", 1.5)]),
    ("[[a] (b", [("a", S * S), (" ", S), ("b", 1.1 * S)]),
    # Numbers: '+' and leading '.' are fine, the regex takes only [+-]?[.\d]+ (no exponent).
    ("(a:+2)", [("a", 2.0)]),
    ("(a:1.)", [("a", 1.0)]),
    ("(a:0.0)", [("a", 0.0)]),
    # Unmatched closers are text; ':' is text unless it is a weight.
    ("a ] b ) c", [("a ] b ) c", 1.0)]),
    ("time: 12:30", [("time: 12:30", 1.0)]),
    # BREAK at the edges and twice; spaces around it are eaten; inside [] it becomes weighted text.
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("[x BREAK y]", [("x", S), ("BREAK", -S), ("y", S)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a, BREAK, b", [("a,", 1.0), ("BREAK", -1.0), (", b", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION, ids=[repr(t) for t, _ in ATTENTION])
def test_parse_attention(text: str, expected: list) -> None:
    got = parse_attention(text)
    assert got == expected
    assert all(isinstance(piece, tuple) and isinstance(piece[1], float) for piece in got)


def test_parse_attention_rejects_a_bad_number_in_one_line() -> None:
    # A1111's regex accepts "1.2.3" and then float() fails; ours says which.
    with pytest.raises(ValueError, match=r"'1\.2\.3'"):
        parse_attention("(a:1.2.3)")


SCHEDULES = [
    # (spec) steps = 20 unless given
    ("a [cat:dog:0.5]", 20, None, [(10, "a cat"), (20, "a dog")]),
    ("a [cat:dog:10]", 20, 20, [(20, "a dog")]),
    ("a [cat:dog:1.5]", 20, 10, [(5, "a cat"), (10, "a dog")]),
    ("a [cat:dog:25]", 20, 10, [(5, "a cat"), (10, "a dog")]),
    ("[a:b:1.0]", 10, None, [(10, "a")]),
    ("[a:b:0]", 20, None, [(20, "b")]),
    ("[a:b:0.04]", 20, None, [(20, "b")]),
    ("a [cat::0.3]", 10, None, [(3, "a cat"), (10, "a ")]),
    ("a [b:c:3] [d:e:7]", 10, None, [(3, "a b d"), (7, "a c d"), (10, "a c e")]),
    ("[a:b:c]", 10, None, [(10, "[a:b:c]")]),
    ("[fe|]male", 4, None, [(1, "female"), (2, "male"), (3, "female"), (4, "male")]),
    # (doctest, steps 10)
    ("test", 10, None, [(10, "test")]),
    ("a [b:3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [b: 3]", 10, None, [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", 10, None, [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", 10, None, [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", 10, None, [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", 10, None, [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", 10, None, [(10, "a [unbalanced")]),
    ("a [b:.5] c", 10, None, [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", 10, None, [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", 10, None, [(i, "a" if i % 2 else "(b:1.1)") for i in range(1, 11)]),
    # More: a switch past the end is clamped; alternation nested in editing; a number with spaces.
    ("[a:b:50]", 10, None, [(10, "a")]),
    ("[a:[x|y]:2]", 3, None, [(1, "a"), (2, "a"), (3, "x")]),
    ("[a:b: 2 ]", 10, None, [(2, "a"), (10, "b")]),
    ("[a:b:-1]", 10, None, [(10, "b")]),
    ("[a:b:1e1]", 20, None, [(10, "a"), (20, "b")]),  # no "." in "1e1": a step, not a fraction
    ("[a|b|c]", 4, None, [(1, "a"), (2, "b"), (3, "c"), (4, "a")]),
    ("(x:1.2) [a:b:2]", 4, None, [(2, "(x:1.2) a"), (4, "(x:1.2) b")]),
    ("[x BREAK y:z:2]", 4, None, [(2, "x BREAK y"), (4, "z")]),
]


@pytest.mark.parametrize(
    ("text", "steps", "hires", "expected"), SCHEDULES, ids=[repr(r[0]) for r in SCHEDULES]
)
def test_prompt_schedule(text: str, steps: int, hires: int | None, expected: list) -> None:
    assert prompt_schedule(text, steps, hires_steps=hires) == expected


def test_old_scheduling_rules() -> None:
    # (spec) before v1.6, 1.0 is a step number, and the hires pass counts with the base pass's numbers.
    assert prompt_schedule("[a:b:1.0]", 10, old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 20, hires_steps=10, old_scheduling=True) == [(10, "a"), (20, "b")]


def test_schedule_index_counts_model_calls_with_a1111s_off_by_one() -> None:
    # (spec) [cat:dog:10] at 20 steps: calls 0..10 use cat (11 calls), 11..19 dog.
    ends = [end for end, _ in prompt_schedule("[cat:dog:10]", 20)]
    used = [schedule_index(ends, call) for call in range(20)]
    assert used == [0] * 11 + [1] * 9
    # [a|b]: calls 0 and 1 use a, then b, a, b...
    ends = [end for end, _ in prompt_schedule("[a|b]", 6)]
    texts = [prompt_schedule("[a|b]", 6)[schedule_index(ends, call)][1] for call in range(6)]
    assert texts == ["a", "a", "b", "a", "b", "a"]
    assert schedule_index([5, 10], 99) == 1


SPLITS = [
    ("x AND y:1.2 AND z", [("x", 1.0), (" y", 1.2), (" z", 1.0)]),  # (spec)
    ("a cat:1.2", [("a cat", 1.2)]),  # (spec) a weight without AND
    ("a cat :1.2 AND a dog", [("a cat", 1.2), (" a dog", 1.0)]),
    ("a cat", [("a cat", 1.0)]),
    ("a cat: .5", [("a cat", 0.5)]),
    ("a cat:-1", [("a cat", -1.0)]),
    ("(a cat:1.2)", [("(a cat:1.2)", 1.0)]),  # an emphasis weight, not a part weight
    ("a ANDb", [("a ANDb", 1.0)]),  # AND needs word boundaries
    ("a and b", [("a and b", 1.0)]),  # and uppercase
    ("line one\nline two:2", [("line one\nline two", 2.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("text", "expected"), SPLITS, ids=[repr(t) for t, _ in SPLITS])
def test_split_and(text: str, expected: list) -> None:
    assert split_and(text) == expected


def test_extract_networks_and_lora_multipliers() -> None:
    text, tags = extract_networks("<lora:foo:0.8> a cat, <hypernet:h:1> <lora:bar:1:0.5> <weird:x>")
    assert text == " a cat,   "
    assert [t.kind for t in tags] == ["lora", "hypernet", "lora", "weird"]
    assert tags[0] == NetworkTag("lora", ("foo", "0.8")) and tags[0].name == "foo"
    assert lora_multipliers(tags[0]) == (0.8, 0.8)  # (spec) unet defaults to te
    assert lora_multipliers(tags[2]) == (1.0, 0.5)
    assert lora_multipliers(NetworkTag("lora", ("x",))) == (1.0, 1.0)
    assert lora_multipliers(NetworkTag("lora", ("x", "unet=0.3", "te=0.7"))) == (0.7, 0.3)
    # named te wins over positional, and the U-Net's default follows the final te
    assert lora_multipliers(NetworkTag("lora", ("x", "0.6", "te=0.2"))) == (0.2, 0.2)
    assert NetworkTag("lora", ("x", "a=b=c")).named() == {}  # A1111 splits twice: positional
    with pytest.raises(ValueError, match="strengths must be numbers"):
        lora_multipliers(NetworkTag("lora", ("x", "strong")))
    assert extract_networks("no tags <here>") == ("no tags <here>", [])
