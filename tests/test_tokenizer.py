"""sd.tokenizer: shipped data == reference vocab/merges, ids == HF CLIPTokenizer on cleaned text, SD rules.

HF's CLIPTokenizer (transformers 5, a test-only dependency) only does NFC + whitespace + lower case, while
the original SD1.5 tokenizer (transformers' slow one with ftfy, and ours) first runs ftfy.fix_text. So
identity is checked against HF fed text cleaned by an independent re-implementation of that cleaning
(`reference_clean`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import ftfy
import pytest
import regex
import torch

from sd import tokenizer as sdtok
from sd.tokenizer import CLIPTokenizer, clean_text

REFERENCE_DIR = Path(
    os.environ.get("SD_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference")
)
HAVE_REFERENCE = (REFERENCE_DIR / "clip-bpe-source.json").exists()
needs_reference = pytest.mark.skipif(
    not HAVE_REFERENCE, reason=f"reference data not found in {REFERENCE_DIR} (set SD_REFERENCE_DIR)"
)

# Pinned from shared/reference/clip-bpe-source.json so the data checks also run without that directory.
MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
VOCAB_SHA256 = "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69"
SANITY = {"a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407]}
BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


def vocab_bytes(vocab: dict[str, int]) -> bytes:
    """Serialisation the reference clip-vocab.json sha256 is of: ids ascending, ensure_ascii=False."""
    return json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False).encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shipped_merges_bytes() -> bytes:
    path = Path(sdtok.__file__).parent / "data" / sdtok.DEFAULT_MERGES_FILE
    return gzip.decompress(path.read_bytes())


# ---- shipped data --------------------------------------------------------------------------------------


def test_shipped_merges_hash() -> None:
    data = shipped_merges_bytes()
    assert sha256(data) == MERGES_SHA256
    assert data.startswith(b"#version: 0.2\n") and data.count(b"\n") == 48895


def test_rebuilt_vocab_hash(tok: CLIPTokenizer) -> None:
    vocab = tok.get_vocab()
    assert len(vocab) == tok.vocab_size == 49408
    assert sha256(vocab_bytes(vocab)) == VOCAB_SHA256
    assert vocab["<|startoftext|>"] == tok.bos_token_id == BOS
    assert vocab["<|endoftext|>"] == tok.eos_token_id == tok.pad_token_id == EOS
    assert tok.model_max_length == 77


@needs_reference
def test_shipped_data_equals_reference_files(tok: CLIPTokenizer) -> None:
    meta = json.loads((REFERENCE_DIR / "clip-bpe-source.json").read_text(encoding="utf-8"))
    ref_merges = (REFERENCE_DIR / "clip-merges.txt").read_bytes()
    ref_vocab = (REFERENCE_DIR / "clip-vocab.json").read_bytes()
    assert meta["clip-merges.txt"]["sha256"] == MERGES_SHA256 == sha256(ref_merges)
    assert meta["clip-vocab.json"]["sha256"] == VOCAB_SHA256 == sha256(ref_vocab)
    assert shipped_merges_bytes() == ref_merges
    assert vocab_bytes(tok.get_vocab()) == ref_vocab
    assert tok.get_vocab() == json.loads(ref_vocab)
    for text, ids in meta["sanity"].items():
        assert tok.encode(text) == ids


@needs_reference
def test_load_from_reference_files() -> None:
    """merges_file / vocab_file load HF-style files (what a diffusers tokenizer/ folder holds)."""
    shipped = CLIPTokenizer()
    from_merges = CLIPTokenizer(merges_file=REFERENCE_DIR / "clip-merges.txt")
    from_both = CLIPTokenizer(REFERENCE_DIR / "clip-merges.txt", REFERENCE_DIR / "clip-vocab.json")
    text = "An astronaut riding a horse, 8k, trending on ArtStation ✨"
    assert from_merges.get_vocab() == shipped.get_vocab()
    assert from_merges.encode(text) == from_both.encode(text) == shipped.encode(text)


def test_sanity(tok: CLIPTokenizer) -> None:
    for text, ids in SANITY.items():
        assert tok.encode(text) == ids
        assert tok.batch_encode_plus([text], padding="max_length", max_length=77).input_ids == [
            ids + [EOS] * (77 - len(ids))
        ]


def test_load_is_cached() -> None:
    a, b = CLIPTokenizer(), CLIPTokenizer()
    assert a.encoder is b.encoder  # second construction reuses the tables


# ---- corpus for the HF identity tests --------------------------------------------------------------------

_TAGS = "masterpiece, best quality, ultra detailed, 8k, sharp focus, cinematic lighting, volumetric fog, "
CORPUS: dict[str, list[str]] = {
    "plain": [
        "a photo of a cat",
        "an astronaut riding a horse on mars",
        "a beautiful sunset over mountains, digital art",
        "portrait of an old fisherman, oil painting by rembrandt",
        "a fantasy landscape painting",
        "blurry, low quality",
        "cyberpunk city at night, neon lights, rain, reflections",
        "a bowl of ramen, studio photography, shallow depth of field",
        "watercolor illustration of a fox in a snowy forest",
        "isometric pixel art of a tiny island",
        "the quick brown fox jumps over the lazy dog",
        "a corgi wearing sunglasses, sitting on a beach chair",
        "macro shot of a dewdrop on a leaf",
        "a cozy cabin in the woods, warm light from the windows",
        "photorealistic render of a vintage sports car, unreal engine",
        "steampunk airship above victorian london",
        "a red apple on a wooden table",
        "minimalist logo of a mountain, vector, flat design",
        "underwater coral reef with tropical fish",
        "a robot reading a book in a library",
        "detailed pencil sketch of a hummingbird",
        "children's book illustration, a bear having a picnic",
        "aerial view of a winding river through autumn forest",
        "a knight in shining armor, dramatic lighting, trending on artstation",
        "still life with flowers and a skull, baroque",
        "ugly, deformed, extra limbs, bad anatomy, watermark, text",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "pneumonoultramicroscopicsilicovolcanoconiosis",
        "by greg rutkowski and alphonse mucha",
        "a",
        "cat",
        "xyzzy qwfp zxcvbnm",
    ],
    "punctuation": [
        "hello, world!",
        "what is this???",
        "wow!!! amazing... really?!",
        "(masterpiece:1.2), [blurry], {detailed}",
        "((best quality)), ((ultra-detailed))",
        "a/b testing; c\\d & e|f",
        "email@example.com #hashtag $100 50% off",
        "--ar 16:9 --v 5",
        "a ~ b ^ c * d + e = f < g > h",
        "\"double quoted\" and 'single quoted'",
        "semi;colon:colon-dash_underscore",
        "...",
        "!!!???",
        "http://example.com/path?x=1&y=2",
        "c++ and c# code",
        "-",
        "_",
        "a - b — c – d",
        "• bullet · middle dot …",
        "«guillemets» „low quotes“",
        "¿qué? ¡sí!",
    ],
    "numbers": [
        "1",
        "12345",
        "1,000,000 stars",
        "3.14159 is pi",
        "2024-01-01 at 12:30pm",
        "4k 8k 16k 1080p",
        "a 1990s photo",
        "½ cup, 2² = 4, 10³",
        "١٢٣ arabic-indic digits",
        "Ⅻ roman numeral twelve",
        "0x1f 0b1010 1e-5",
        "v1.5 and sd2.1",
    ],
    "accents": [
        "café crème brûlée",
        "naïve façade déjà vu",
        "über straße müller",
        "smörgåsbord fjörd",
        "piñata jalapeño señor",
        "crème de la crème à la mode",
        "łódź żółć gęś",
        "čeština šťastný",
        "ελληνικά γράμματα",
        "ΟΔΟΣ σοφία",
        "İstanbul ışık",
        "русский текст, москва",
        "tiếng việt có dấu",
        "e\u0301 combining accent",
    ],
    "cjk_scripts": [
        "日本の風景、富士山",
        "一只可爱的猫",
        "東京タワー 夜景",
        "ひらがな カタカナ 漢字",
        "한국어 프롬프트 서울",
        "中文、日本語、한국어 mixed with english",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "ქართული ენა",
        "አማርኛ",
        "𝓯𝓪𝓷𝓬𝔂 𝕥𝕖𝕩𝕥",
        "\U00020000\U0002a700 rare han",
    ],
    "emoji": [
        "🐱",
        "a cat 🐱 and a dog 🐶",
        "👩‍🚀 astronaut",
        "🏳️‍🌈 flag",
        "👍🏽 thumbs up",
        "🇯🇵🇺🇸 flags",
        "❤️ love",
        "☕️ coffee time",
        "✨sparkles✨",
        "🔥🔥🔥 fire",
        "💯",
        "😀😃😄😁😆😅😂🤣",
    ],
    "html": [
        "fish &amp; chips",
        "&lt;tag&gt;",
        "&quot;quoted&quot;",
        "caf&eacute;",
        "&#169; 2024 &#x2122;",
        "&amp;amp; double",
        "<b>bold &amp; brave</b>",
        "&notanentity;",
        "a&nbsp;b",
        "&#128049; cat entity",
        "5 &gt; 3 &lt; 4",
        "AT&T",
    ],
    "whitespace": [
        "  leading and trailing  ",
        "multiple    spaces   between",
        "tabs\tand\ttabs",
        "new\nline\n\nparagraph",
        "windows\r\nline endings",
        "nbsp\u00a0space",
        "ideographic\u3000space",
        "line\u2028separator",
        "zero\u200bwidth",
        "\t\n \r\n",
        "mixed \t \n whitespace\x0bvertical\x0cformfeed",
        "a\u2003em\u2009thin\u202fnarrow space",
    ],
    "upper_case": [
        "A PHOTO OF A CAT",
        "An Astronaut Riding A Horse",
        "NASA JPEG HDR UHD",
        "CamelCaseWordsTogether",
        "iPhone MacBook YouTube",
        "ALL CAPS WITH PUNCTUATION!!!",
        "ÀÉÎÕÜ ÇÑ",
        "STRASSE ß",
    ],
    "contractions": [
        "it's a cat's toy",
        "don't stop, can't stop, won't stop",
        "they're we've i'm you'll he'd",
        "IT'S LOUD, I'M HERE, THEY'LL SEE",
        "'s at start",
        "rock 'n' roll",
        "o'clock o'neill",
        "the dogs' bones",
        "it’s curly",
        "don`t backtick",
    ],
    "long": [
        _TAGS * 8,
        " ".join(["masterpiece"] * 100),
        "a " * 74,
        "a " * 75,
        "a " * 76,
        "a " * 200,
        "a highly detailed, intricate, elegant, sharp focus, beautiful portrait of a young woman with flowing"
        " red hair standing in a field of sunflowers at golden hour, soft rim light, bokeh background, shot"
        " on kodak portra 400, 85mm lens, f/1.4, award winning photograph, trending on artstation, by annie"
        " leibovitz and steve mccurry, hyperrealistic, 8k resolution, octane render",
        "🐱" * 50,
        "日本" * 60,
        "1234567890" * 10,
    ],
    "empty": ["", " ", "\n", "\t \t"],
    "special_literals": [
        "<|endoftext|>",
        "<|startoftext|>",
        "a photo <|endoftext|> cat",
        "a<|endoftext|>b",
        "!<|endoftext|>",
        "<|endoftext|><|endoftext|>",
        "<|startoftext|>hello<|endoftext|>",
        "'<|endoftext|>'s",
        "<| endoftext |>",
        "<|endoftext",
    ],
    "cleaning": [
        "“curly double” ‘curly single’",
        "a cafÃ© in paris",
        "ＡＢＣ１２３ fullwidth",
        "ｶﾀｶﾅ halfwidth",
        "ﬁne ﬂowers ﬀ",
        "ǅemal digraph",
        "\x1b[31mred terminal\x1b[0m",
        "control\x00\x07chars",
        "soft\u00adhyphen",
        "â€œmojibake quotesâ€\x9d",
        "doesnâ€™t work",
        "，。！ fullwidth punctuation",
    ],
}
CASES = [(cat, i, text) for cat, texts in CORPUS.items() for i, text in enumerate(texts)]
_WS = regex.compile(r"\s+")


def reference_clean(text: str) -> str:
    """Independent rewrite of the slow HF CLIPTokenizer's whitespace_clean(ftfy.fix_text(text)).lower(), what
    CompVis' FrozenCLIPEmbedder (and A1111) tokenize with. Unlike OpenAI CLIP's basic_clean there is no
    html.unescape after ftfy.

    The lower() matters too: Python's applies the Greek final-sigma rule, HF's Lowercase does not.
    """
    text = ftfy.fix_text(text).strip()
    return _WS.sub(" ", text).strip().lower()


def test_corpus_size() -> None:
    assert len(CASES) >= 150


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("identity tests target transformers 5 CLIPTokenizer (no ftfy cleaning)")
    # Built offline from files, never from the hub. Prefer the reference files; without them, the shipped
    # data (whose identity with the reference is pinned by the sha256 tests above) still tests the BPE.
    if HAVE_REFERENCE:
        vocab = json.loads((REFERENCE_DIR / "clip-vocab.json").read_text(encoding="utf-8"))
        merges_text = (REFERENCE_DIR / "clip-merges.txt").read_text(encoding="utf-8")
    else:
        vocab = CLIPTokenizer().get_vocab()
        merges_text = shipped_merges_bytes().decode("utf-8")
    merges = [tuple(line.split(" ")) for line in merges_text.split("\n")[1:] if line]
    hf_tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    assert hf_tok("a photo of a cat").input_ids == SANITY["a photo of a cat"]
    return hf_tok


def hf_ids(hf, text: str) -> list[int]:
    """Called the way diffusers' StableDiffusionPipeline does."""
    return hf(text, padding="max_length", max_length=77, truncation=True).input_ids


@pytest.mark.parametrize(("category", "index", "text"), CASES, ids=[f"{c}-{i}" for c, i, _ in CASES])
def test_matches_hf_on_cleaned_text(tok: CLIPTokenizer, hf, category: str, index: int, text: str) -> None:
    cleaned = reference_clean(text)
    ours = tok.batch_encode_plus([text], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ours) == 77
    assert ours == hf_ids(hf, cleaned)
    # Unpadded, untruncated: also identical, so count_tokens is right for over-long prompts.
    assert tok.encode(text) == hf(cleaned).input_ids
    assert tok.count_tokens(text) == len(hf(cleaned).input_ids) - 2


def test_batch_and_tensor_match_hf(tok: CLIPTokenizer, hf) -> None:
    texts = [text for _, _, text in CASES]
    want = hf(
        [reference_clean(t) for t in texts], padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert (
        tok.batch_encode_plus(texts, padding="max_length", max_length=77, truncation=True).input_ids == want
    )
    tensor = tok(texts)
    assert tensor.dtype == torch.long and tensor.shape == (len(texts), 77)
    assert tensor.tolist() == want
    assert tok.tokenize(texts).tolist() == want


def test_plain_text_matches_hf_without_cleaning(tok: CLIPTokenizer, hf) -> None:
    """Where cleaning changes nothing beyond whitespace/case, HF on the raw text agrees too."""
    for category in ("plain", "numbers", "cjk_scripts", "upper_case", "long", "empty"):
        for text in CORPUS[category]:
            assert tok.encode(text) == hf(text).input_ids, text


# ---- cleaning: where the original CLIP/SD1.5 tokenizer differs from plain HF ---------------------------

CLEANING_CASES = {
    "fish &amp; chips": "fish & chips",
    "“curly double” ‘single’": "\"curly double\" 'single'",
    "a cafÃ© in paris": "a café in paris",
    "ＡＢＣ１２３": "abc123",
    "ﬁne ﬂowers": "fine flowers",
    "&amp;amp;": "&",
    "don’t": "don't",
    "ΟΔΟΣ": "οδος",  # Python's lower() applies the final-sigma rule, HF's Lowercase does not
}


@pytest.mark.parametrize(("raw", "cleaned"), CLEANING_CASES.items())
def test_cleaning_cases(tok: CLIPTokenizer, hf, raw: str, cleaned: str) -> None:
    assert clean_text(raw) == cleaned
    assert tok.encode(raw) == hf(cleaned).input_ids
    # Plain HF on the raw text gets these wrong: fails if our cleaning step were dropped.
    assert tok.encode(raw) != hf(raw).input_ids


def test_entities_beside_a_tag_are_kept_as_sd_keeps_them(tok: CLIPTokenizer, hf) -> None:
    """ftfy unescapes HTML only in text without '<'; SD1.5's tokenizer adds no html.unescape of its own
    (OpenAI CLIP's does: it would read '<b>&</b>')."""
    assert clean_text("<b>&amp;</b>") == "<b>&amp;</b>"
    assert tok.encode("<b>&amp;</b>") == hf("<b>&amp;</b>").input_ids
    assert tok.encode("<b>&amp;</b>") != hf("<b>&</b>").input_ids


def test_clean_text_whitespace() -> None:
    assert clean_text("  A\tB\n\nC\u3000D\u00a0E  ") == "a b c d e"
    assert clean_text("") == ""


# ---- SD1.5 conventions ----------------------------------------------------------------------------------


def test_empty_prompt(tok: CLIPTokenizer) -> None:
    assert tok.encode("") == [BOS, EOS]
    assert tok("")[0].tolist() == [BOS] + [EOS] * 76
    assert tok.batch_encode_plus([""], padding="max_length", max_length=77).input_ids == [[BOS] + [EOS] * 76]


def test_truncation_keeps_end_token(tok: CLIPTokenizer) -> None:
    text = " ".join(["cat"] * 100)
    cat = tok.encode("cat")[1]
    assert tok.count_tokens(text) == 100
    assert len(tok.encode(text)) == 102  # encode never truncates
    row = tok(text)[0].tolist()
    assert row == [BOS] + [cat] * 75 + [EOS]
    # Boundary: 75 content tokens fit exactly, 76 do not.
    assert tok.truncated_part("a " * 75) == ""
    assert tok.truncated_part("a " * 76) == "a"
    assert tok.truncated_part(" ".join(["x"] * 75 + ["purple", "elephant"])) == "purple elephant"
    assert tok("a " * 76)[0].tolist() == tok("a " * 75)[0].tolist()


def test_padding_and_attention_mask(tok: CLIPTokenizer) -> None:
    enc = tok.batch_encode_plus(["a photo of a cat"], padding="max_length", max_length=77)
    assert enc.input_ids[0][7:] == [EOS] * 70
    assert enc["attention_mask"][0] == [1] * 7 + [0] * 70


def test_batch_encode_plus_options(tok: CLIPTokenizer) -> None:
    long = "a " * 100
    # No padding, no truncation: raw lengths.
    enc = tok.batch_encode_plus(["a", long], truncation=False)
    assert [len(r) for r in enc.input_ids] == [3, 102]
    # truncation=False is overridden by max_length padding (77 positions in the text encoder).
    enc = tok.batch_encode_plus([long], padding="max_length", max_length=77, truncation=False)
    assert len(enc.input_ids[0]) == 77 and enc.input_ids[0][-1] == EOS
    # Pad to the longest in the batch.
    enc = tok.batch_encode_plus(["a", "a photo of a cat"], padding=True)
    assert enc.input_ids == [[BOS, 320, EOS, EOS, EOS, EOS, EOS], SANITY["a photo of a cat"]]
    assert enc.attention_mask[0] == [1, 1, 1, 0, 0, 0, 0]
    # max_length without padding truncates (HF default), keeping the end token.
    enc = tok.batch_encode_plus([long], max_length=10)
    assert enc.input_ids == [[BOS] + [320] * 8 + [EOS]]
    # Without special tokens.
    enc = tok.batch_encode_plus(["a photo"], add_special_tokens=False)
    assert enc.input_ids == [[320, 1125]]
    # Tensors.
    enc = tok.batch_encode_plus(["a", "b"], padding="max_length", return_tensors="pt")
    assert enc.input_ids.shape == (2, 77) and enc.attention_mask.sum().item() == 6
    with pytest.raises(ValueError):
        tok.batch_encode_plus(["a", "a photo"], return_tensors="pt")
    with pytest.raises(ValueError):
        tok.batch_encode_plus(["a"], padding="sideways")


def test_special_token_literals(tok: CLIPTokenizer) -> None:
    assert tok.encode("a photo <|endoftext|> cat") == [BOS, 320, 1125, EOS, 2368, EOS]
    assert tok.encode("<|startoftext|>") == [BOS, BOS, EOS]
    assert tok.encode("!<|endoftext|>") == [BOS, 256, EOS, EOS]
    # After lower-casing, as the original CLIP does (HF 5 alone would spell this one out as text).
    assert tok.encode("<|ENDOFTEXT|>") == [BOS, EOS, EOS]
    assert tok.encode("<| endoftext |>")[1:-1] != [EOS]


def test_decode(tok: CLIPTokenizer, hf) -> None:
    for text in ["a photo of a cat", "Hello, world! café 日本 ✨ <|endoftext|>", "🏳️‍🌈 flag", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok("a photo of a cat")[0], skip_special_tokens=True) == "a photo of a cat"
    assert tok.convert_ids_to_tokens([320, 1125]) == ["a</w>", "photo</w>"]


def test_bpe_cache_consistent(tok: CLIPTokenizer) -> None:
    text = "antidisestablishmentarianism " * 3
    assert tok.encode(text) == tok.encode(text)
    assert len(set(tok.encode(text)[1:-1])) < tok.count_tokens(text)
