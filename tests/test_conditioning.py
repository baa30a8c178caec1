"""sd.conditioning and sd.embeddings: A1111's chunking, emphasis and textual inversion.

Chunking is checked with exact token ids (the rows marked (spec) are a1111-semantics.md §b1's worked
examples, printed by A1111's code with this tokenizer). Conditioning is checked against a direct computation
with the text encoder, bit for bit where the operations are the same. Textual inversion is checked against
diffusers' `load_textual_inversion` + `encode_prompt` on the same random embedding (same weights in
transformers' CLIPTextModel: max |difference| <= 1e-5 of the scale, as the CLIP parity tests allow).
"""

from __future__ import annotations

import base64
import copy
import json

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from sd.conditioning import PromptEncoder, condition, tokenize_prompt
from sd.config import TINY
from sd.embeddings import Embedding, EmbeddingError, Embeddings, load_embedding, ti_hashes
from sd.testing import random_models
from sd.tokenizer import CLIPTokenizer

from conftest import World

BOS, EOS, COMMA, CAT, DOG = 49406, 49407, 267, 2368, 1929
WIDTH = TINY.clip.width


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def clip() -> torch.nn.Module:
    return random_models(TINY, seed=5)["clip"].eval()


def ids(tok: CLIPTokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def closed(content: list[int]) -> list[int]:
    return [BOS, *content, *[EOS] * (75 - len(content)), EOS]


def chunk_tokens(tok, text: str, embeddings=None, **kwargs) -> list[list[int]]:
    return [c.tokens for c in tokenize_prompt(text, tok, embeddings, **kwargs).chunks]


def make_embeddings(tok: CLIPTokenizer, **vectors: torch.Tensor) -> Embeddings:
    found = Embeddings(lambda text: ids(tok, text), WIDTH)
    for name, tensor in vectors.items():
        found.add(Embedding(name, tensor))
    return found


# --- chunking -----------------------------------------------------------------------------------------


def test_worked_chunking_examples(tok) -> None:
    # (spec) every row of the table
    assert chunk_tokens(tok, "a photo of a cat") == [closed([320, 1125, 539, 320, CAT])]
    assert chunk_tokens(tok, "cat " * 75) == [closed([CAT] * 75)]
    assert chunk_tokens(tok, "cat " * 76) == [closed([CAT] * 75), closed([CAT])]
    assert chunk_tokens(tok, "cat " * 60 + ", " + "dog " * 20) == [
        closed([CAT] * 60 + [COMMA]),
        closed([DOG] * 20),
    ]
    assert chunk_tokens(tok, "cat " * 50 + ", " + "dog " * 30) == [
        closed([CAT] * 50 + [COMMA] + [DOG] * 24),
        closed([DOG] * 6),
    ]
    assert chunk_tokens(tok, "cat " * 74 + ", dog") == [closed([CAT] * 74 + [COMMA]), closed([DOG])]
    assert chunk_tokens(tok, "cat " * 75 + ", dog") == [closed([CAT] * 75), closed([COMMA, DOG])]
    assert chunk_tokens(tok, "a BREAK b") == [closed(ids(tok, "a")), closed(ids(tok, "b"))]
    assert chunk_tokens(tok, "BREAK a") == [closed([]), closed(ids(tok, "a"))]


def test_chunking_edges(tok) -> None:
    assert chunk_tokens(tok, "") == [closed([])]  # one chunk, [BOS, EOS x 76]
    assert chunk_tokens(tok, "a BREAK") == [closed(ids(tok, "a"))]  # a trailing BREAK adds nothing
    assert chunk_tokens(tok, "a BREAK BREAK b") == [closed(ids(tok, "a")), closed([]), closed(ids(tok, "b"))]
    # Backtracking off: the chunk fills to 75 whatever the comma.
    text = "cat " * 60 + ", " + "dog " * 20
    assert chunk_tokens(tok, text, comma_backtrack=0) == [
        closed([CAT] * 60 + [COMMA] + [DOG] * 14),
        closed([DOG] * 6),
    ]
    # A comma more than 20 tokens back does not move words (75 - 54 = 21).
    assert chunk_tokens(tok, "cat " * 54 + ", " + "dog " * 30)[0] == closed([CAT] * 54 + [COMMA] + [DOG] * 20)
    # BREAK inside brackets is the word "break", weighted.
    (chunk,) = tokenize_prompt("(a BREAK b)", tok).chunks
    assert chunk.tokens == closed(ids(tok, "a break b"))
    assert chunk.multipliers[1:4] == [1.1, -1.1, 1.1]
    # "None": no syntax at all, brackets are text and BREAK is a word.
    assert chunk_tokens(tok, "(cat:1.5) BREAK", emphasis="None") == [closed(ids(tok, "(cat:1.5) BREAK"))]


def test_token_counts_and_a_300_token_prompt(tok) -> None:
    words = [f"w{i}" for i in range(150)]  # "w", digit(s): 300+ tokens, no commas
    text = " ".join(words)
    expected = ids(tok, text)
    tokenized = tokenize_prompt(text, tok)
    assert len(expected) > 300
    content = [t for c in tokenized.chunks for t in c.tokens[1:-1] if t != EOS]
    assert content == expected  # nothing dropped, nothing reordered
    assert len(tokenized.chunks) == -(-len(expected) // 75)
    assert tokenized.token_count == 75 * (len(tokenized.chunks) - 1) + len(expected) % 75 or 75
    assert tokenize_prompt("a cat", tok).token_count == 2
    assert tokenize_prompt("cat " * 75 + "BREAK dog", tok).token_count == 76  # 75 + 1


def test_weights_follow_their_tokens_into_chunks(tok) -> None:
    chunks = tokenize_prompt("cat " * 74 + "(dog dog:1.5)", tok).chunks
    assert chunks[0].multipliers[75] == 1.5 and chunks[1].multipliers[1] == 1.5
    assert chunks[0].multipliers[0] == chunks[0].multipliers[76] == 1.0
    assert tokenize_prompt("cat", tok).chunks[0].multipliers == [1.0] * 77


def test_embeddings_are_matched_by_tokens_and_never_split(tok) -> None:
    three = torch.randn(3, WIDTH)
    embeddings = make_embeddings(
        tok, mytok=three, **{"foo bar": torch.randn(2, WIDTH), "foo": torch.randn(1, WIDTH)}
    )
    assert len(ids(tok, "mytok")) == 2  # a two-token name, three vectors

    (chunk,) = tokenize_prompt("a MyTok cat", tok, embeddings).chunks  # case-insensitive, as tokens are
    assert chunk.tokens == closed([320, 0, 0, 0, CAT])
    assert [(offset, e.name) for offset, e in chunk.fixes] == [(1, "mytok")]
    # Longest name first: "foo bar" wins over "foo".
    (chunk,) = tokenize_prompt("foo bar foo", tok, embeddings).chunks
    assert [(offset, e.name) for offset, e in chunk.fixes] == [(0, "foo bar"), (2, "foo")]
    # At the boundary: 73 + 3 > 75 starts a new chunk; 72 + 3 fits exactly.
    chunks = tokenize_prompt("cat " * 73 + "mytok", tok, embeddings).chunks
    assert chunks[0].tokens == closed([CAT] * 73) and chunks[1].tokens == closed([0, 0, 0])
    assert [(offset, e.name) for offset, e in chunks[1].fixes] == [(0, "mytok")]
    chunks = tokenize_prompt("cat " * 72 + "mytok", tok, embeddings).chunks
    assert len(chunks) == 1 and chunks[0].fixes[0][0] == 72
    # Weights apply to every vector.
    (chunk,) = tokenize_prompt("(mytok:1.2)", tok, embeddings).chunks
    assert chunk.multipliers[1:4] == [1.2] * 3
    assert [e.name for e in tokenize_prompt("mytok foo mytok", tok, embeddings).embeddings] == [
        "mytok",
        "foo",
    ]


# --- conditioning ---------------------------------------------------------------------------------------


def encoder(clip, tok, **kwargs) -> PromptEncoder:
    return PromptEncoder(lambda: clip, tok, **kwargs)


def encode(clip, tok, text: str, **kwargs) -> torch.Tensor:
    (z,), _ = encoder(clip, tok, **kwargs).encode_groups([[text]])
    return z


def direct(clip, tok, text: str, clip_skip: int = 1) -> torch.Tensor:
    return clip(torch.tensor([closed(ids(tok, text))]), clip_skip=clip_skip)


@torch.no_grad()
def test_a_plain_prompt_is_exactly_the_text_encoders_output(clip, tok) -> None:
    text = "a watercolor painting of a lighthouse at dusk"
    assert torch.equal(encode(clip, tok, text), direct(clip, tok, text))
    assert torch.equal(encode(clip, tok, text, clip_skip=2), direct(clip, tok, text, clip_skip=2))
    # clip skip 2 is layer 11's output then the final layer norm (A1111's count)
    states = clip.hidden_states(torch.tensor([closed(ids(tok, text))]))
    assert torch.equal(direct(clip, tok, text, 2), clip.text_model.final_layer_norm(states[-2]))


@torch.no_grad()
def test_one_weighted_token_is_that_row_scaled_then_renormalised(clip, tok) -> None:
    z = direct(clip, tok, "a cat photo")
    weights = torch.ones(1, 77)
    weights[0, 2] = 1.5  # BOS, "a", "cat"
    scaled = z * weights[..., None]
    assert torch.equal(encode(clip, tok, "a (cat:1.5) photo", emphasis="No norm"), scaled)
    expected = scaled * (z.mean() / scaled.mean())
    assert torch.equal(encode(clip, tok, "a (cat:1.5) photo"), expected)
    assert torch.equal(encode(clip, tok, "a (cat:1.5) photo", emphasis="Ignore"), z)
    literal = encode(clip, tok, "a (cat:1.5) photo", emphasis="None")
    assert torch.equal(literal, direct(clip, tok, "a (cat:1.5) photo"))
    assert not torch.equal(literal, z)


@torch.no_grad()
def test_long_prompts_concatenate_independently_encoded_chunks(clip, tok) -> None:
    text = "cat " * 80 + "BREAK dog"
    z = encode(clip, tok, text)
    assert z.shape == (1, 3 * 77, WIDTH)
    assert torch.equal(z[:, :77], direct(clip, tok, "cat " * 75))
    assert torch.equal(z[:, 77:154], direct(clip, tok, "cat " * 5))
    assert torch.equal(z[:, 154:], direct(clip, tok, "dog"))


@torch.no_grad()
def test_schedule_variants_share_one_mean_and_pad_with_empty_chunks(clip, tok) -> None:
    # A1111 encodes a prompt's variants in one call: "Original" restores the mean over all of them.
    (z,), _ = encoder(clip, tok).encode_groups([["a (cat:1.5)", "a dog"]])
    plain = torch.cat([direct(clip, tok, "a cat"), direct(clip, tok, "a dog")])
    weights = torch.ones(2, 77)
    weights[0, 2] = 1.5
    scaled = plain * weights[..., None]
    assert torch.equal(z, scaled * (plain.mean() / scaled.mean()))
    # A variant with fewer chunks gets the empty chunk [BOS, EOS x 76] where it has none.
    (z,), _ = encoder(clip, tok).encode_groups([["cat", "cat " * 80]])
    assert z.shape == (2, 154, WIDTH)
    assert torch.equal(z[0, 77:], direct(clip, tok, "")[0])


@torch.no_grad()
def test_condition_splits_and_schedules_and_encodes_each_text_once(clip, tok) -> None:
    calls = []

    def counting_clip():
        def run(tokens, clip_skip=1, token_embeds=None):
            calls.append(tokens.shape[0])
            return clip(tokens, clip_skip=clip_skip, token_embeds=token_embeds)

        run.token_embeddings = clip.token_embeddings
        return run

    enc = PromptEncoder(counting_clip, tok)
    cond = condition(enc, "a [cat:dog:5] AND a hat:0.5 AND a [cat:dog:5]", "blurry", 10, pad_conds=True)
    assert calls == [5]  # one CLIP batch: "blurry", "a cat", "a dog", "a hat", "" (for pad conds)
    assert cond.uncond.ends == [10] and [w for _, w in cond.parts] == [1.0, 0.5, 1.0]
    first, hat, again = (scheduled for scheduled, _ in cond.parts)
    # Parts keep their leading space, so these are two texts ("a [cat:dog:5]", " a [cat:dog:5]"), equal
    # as tokens.
    assert first.ends == again.ends == [5, 10] and torch.equal(first.tensors, again.tensors)
    assert torch.equal(first.at(5), first.tensors[0]) and torch.equal(first.at(6), first.tensors[1])
    assert torch.equal(hat.at(0), direct(clip, tok, "a hat")[0])
    assert torch.equal(cond.empty, direct(clip, tok, "")[0])


# --- textual inversion files -----------------------------------------------------------------------------


def write_formats(folder, vectors: torch.Tensor) -> None:
    """The same vectors in every format people have."""
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "other", "step": 100,
             "sd_checkpoint": None, "sd_checkpoint_name": None}  # fmt: skip
    torch.save(a1111, folder / "a1111.pt")
    save_file({"emb_params": vectors}, str(folder / "onetrainer.safetensors"))
    torch.save({"<tok>": vectors[0]}, folder / "diffusers.bin")
    data = {"string_to_param": {"*": {"TORCHTENSOR": vectors.tolist()}}, "name": "pictured"}
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(data).encode()).decode())
    Image.new("RGB", (8, 8)).save(folder / "card.png", pnginfo=info)
    Image.new("RGB", (8, 8)).save(folder / "a1111.preview.png")  # a preview picture: not an embedding
    (folder / "empty.pt").write_bytes(b"")
    (folder / "notes.txt").write_text("not an embedding")


def test_every_format_loads(tmp_path, tok) -> None:
    vectors = torch.randn(3, WIDTH)
    (tmp_path / "sub").mkdir()
    write_formats(tmp_path / "sub", vectors)
    found = Embeddings(lambda text: ids(tok, text), WIDTH)
    found.load_folder(tmp_path)
    assert sorted(found.by_name) == [
        "a1111",
        "diffusers",
        "onetrainer",
        "pictured",
    ]  # file stems; PNG: its name
    assert found.skipped == {}
    for name in ("a1111", "onetrainer", "pictured"):
        assert torch.equal(found.by_name[name].vectors, vectors), name
    assert torch.equal(found.by_name["diffusers"].vectors, vectors[:1])  # a 1-D vector is one token


def test_wrong_sizes_are_skipped_with_the_reason(tmp_path, tok) -> None:
    save_file(
        {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors")
    )
    save_file({"emb_params": torch.randn(2, 1024)}, str(tmp_path / "sd2.safetensors"))
    save_file({"a": torch.randn(2, WIDTH), "b": torch.randn(2, WIDTH)}, str(tmp_path / "two.safetensors"))
    save_file({"emb_params": torch.randn(76, 768)}, str(tmp_path / "huge.safetensors"))
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    found = Embeddings(lambda text: ids(tok, text), 768)
    found.load_folder(tmp_path)
    assert len(found) == 0
    reasons = {path.rsplit("/", 1)[-1]: why for path, why in found.skipped.items()}
    assert "an SDXL embedding (clip_g + clip_l)" in reasons["xl.safetensors"]
    assert "an SD2 embedding of width 1024" in reasons["sd2.safetensors"]
    assert "not an embedding (keys: a, b)" in reasons["two.safetensors"]
    assert "76 vectors; a prompt chunk holds 75" in reasons["huge.safetensors"]
    assert "without an sd-ti-embedding" in reasons["photo.png"]
    assert all("\n" not in why for why in reasons.values())


class Malicious:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_malicious_pt_is_refused_and_its_code_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"string_to_param": {"*": Malicious(str(marker))}}, tmp_path / "evil.pt")
    with pytest.raises(EmbeddingError, match=r"refusing to unpickle: needs builtins\.exec"):
        load_embedding(tmp_path / "evil.pt")
    assert not marker.exists()


def test_ti_hashes_are_a1111s(tmp_path) -> None:
    import hashlib

    torch.save({"string_to_param": {"*": torch.randn(2, WIDTH)}}, tmp_path / "Easy:Neg,ative.pt")
    embedding = load_embedding(tmp_path / "Easy:Neg,ative.pt")
    digest = hashlib.sha256((tmp_path / "Easy:Neg,ative.pt").read_bytes()).hexdigest()
    assert ti_hashes([embedding]) == f"EasyNegative: {digest[:12]}"
    assert ti_hashes([]) is None


# --- against diffusers -------------------------------------------------------------------------------


def test_textual_inversion_matches_diffusers(world: World, tmp_path) -> None:
    if world.name != "tiny":
        pytest.skip("the tiny model proves the mapping; the full-size CLIP is covered by the parity tests")
    from diffusers import StableDiffusionPipeline

    from reference import reference_tokenizer
    from test_parity import assert_close

    gen = torch.Generator().manual_seed(11)
    single = torch.randn(1, WIDTH, generator=gen) * 0.02
    multi = torch.randn(3, WIDTH, generator=gen) * 0.02
    torch.save({"string_to_param": {"*": single}, "name": "mytok"}, tmp_path / "mytok.pt")
    torch.save({"string_to_param": {"*": multi}, "name": "threetok"}, tmp_path / "threetok.pt")
    reference = StableDiffusionPipeline(vae=None, text_encoder=copy.deepcopy(world.text_encoder),
                                        tokenizer=reference_tokenizer(), unet=None, scheduler=None,
                                        safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False)  # fmt: skip
    reference.load_textual_inversion(str(tmp_path / "mytok.pt"), token="mytok")
    reference.load_textual_inversion(str(tmp_path / "threetok.pt"), token="threetok")

    from sd.pipeline import Pipeline

    pipe = Pipeline(world.ours, embeddings=tmp_path)
    assert sorted(pipe.embeddings.by_name) == ["mytok", "threetok"]
    enc = pipe.prompt_encoder()
    for prompt in ("a photo of mytok on a table", "threetok in a garden", "mytok and threetok"):
        ours, used = enc.encode_groups([[prompt]])
        theirs, _ = reference.encode_prompt(prompt, "cpu", 1, False)
        assert_close(ours[0], theirs, f"textual inversion {prompt!r}")
        assert used
    # Emphasis multiplies the vectors' outputs like any token's (A1111's rule; diffusers has none).
    weighted, _ = enc.encode_groups([["a photo of (mytok:1.2) on a table"]])
    plain, _ = enc.encode_groups([["a photo of mytok on a table"]])
    weights = torch.ones(1, 77)
    weights[0, 4] = 1.2
    scaled = plain[0] * weights[..., None]
    assert torch.allclose(weighted[0], scaled * (plain[0].mean() / scaled.mean()), atol=1e-6)
