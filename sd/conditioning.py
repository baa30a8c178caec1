"""CLIP conditioning of prompts of any length, as A1111 v1.10.1 computes it (sd_hijack_clip.py).

A prompt's emphasis pieces (`sd.prompts.parse_attention`) are tokenized one by one and packed into chunks
of 75 tokens; BREAK closes a chunk, and a chunk that fills up within 20 tokens of a comma moves the words
after that comma to the next one. Each chunk becomes [BOS] + 75 tokens (EOS-padded) + [EOS] and is encoded
on its own; the chunks' outputs are concatenated, so the U-Net sees 77·k tokens of context. Emphasis
multiplies each token's output after the final layer norm and then ("Original") rescales the chunk so its
mean is what it was. Textual-inversion vectors replace the slots of their name's tokens before the
transformer runs.

Plain prompts (no syntax, at most 75 tokens) give exactly the conditioning of `clip(tokenizer(prompt))`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .embeddings import Embedding, Embeddings
from .prompts import is_break, parse_attention, prompt_schedule, schedule_index, split_and

CHUNK_LENGTH = 75  # prompt tokens per chunk; with BOS and EOS a chunk is CLIP's 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
# "Original": multiply, then restore the chunk's mean; "No norm": multiply only; "Ignore": parse the
# syntax but use no weights; "None": no syntax at all (brackets and BREAK are plain text).
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@dataclass
class Chunk:
    """Up to 75 prompt tokens (77 once closed) with their multipliers, and the embeddings placed in it
    as (offset among the prompt tokens, embedding)."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)


@dataclass
class TokenizedPrompt:
    chunks: list[Chunk]
    token_count: int  # what A1111 shows: 75 per full chunk plus the tokens of the last
    embeddings: list[Embedding]  # the embeddings used, in order of first use

    @property
    def capacity(self) -> int:
        return CHUNK_LENGTH * len(self.chunks)


def check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}; got {emphasis!r}")


def _token_ids(tokenizer: object, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_prompt(
    text: str,
    tokenizer: object,
    embeddings: Embeddings | None = None,
    emphasis: str = "Original",
    comma_backtrack: int = COMMA_BACKTRACK,
) -> TokenizedPrompt:
    """A1111's tokenize_line: one prompt text (no AND, no editing left) -> closed 77-token chunks."""
    check_emphasis(emphasis)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    pieces = parse_attention(text) if emphasis != "None" else [(text, 1.0)]

    chunks: list[Chunk] = []
    chunk = Chunk()
    token_count = 0
    last_comma = -1
    used: dict[int, Embedding] = {}

    def close(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        padding = CHUNK_LENGTH - len(chunk.tokens)
        chunk.tokens = [bos, *chunk.tokens, *[eos] * padding, eos]
        chunk.multipliers = [1.0, *chunk.multipliers, *[1.0] * padding, 1.0]
        chunks.append(chunk)
        chunk = Chunk()
        last_comma = -1

    for piece in pieces:
        if is_break(piece):
            close()
            continue
        piece_text, weight = piece
        tokens = _token_ids(tokenizer, piece_text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif (
                comma_backtrack
                and len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= comma_backtrack
            ):
                # The chunk is full and a comma is near: the words after it start the next chunk.
                cut = last_comma + 1
                moved_tokens, moved_multipliers = chunk.tokens[cut:], chunk.multipliers[cut:]
                del chunk.tokens[cut:], chunk.multipliers[cut:]
                close()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_multipliers
            if len(chunk.tokens) == CHUNK_LENGTH:
                close()
            found = embeddings.match(tokens, position) if embeddings else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            embedding, name_length = found
            if len(chunk.tokens) + len(embedding) > CHUNK_LENGTH:
                close()  # an embedding's vectors are never split across chunks
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * len(embedding)
            chunk.multipliers += [weight] * len(embedding)
            used.setdefault(id(embedding), embedding)
            position += name_length
    if chunk.tokens or not chunks:
        close(is_last=True)
    return TokenizedPrompt(chunks, token_count, list(used.values()))


def _empty_chunk(bos: int, eos: int) -> Chunk:
    return Chunk([bos, *[eos] * (CHUNK_LENGTH + 1)], [1.0] * (CHUNK_LENGTH + 2))


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, emphasis: str) -> torch.Tensor:
    """z (B, 77, width) of one chunk position, multipliers (B, 77). "Original" restores the mean over the
    whole (B, 77, width) block, one scalar, as A1111 does."""
    if emphasis in ("Ignore", "None") or bool((multipliers == 1).all()):
        return z  # what the arithmetic gives too: z * 1 * (m / m)
    weighted = z * multipliers[..., None].to(z)
    if emphasis == "No norm":
        return weighted
    return weighted * (z.mean() / weighted.mean())


class PromptEncoder:
    """Texts -> CLIP conditioning, with A1111's chunking, emphasis, clip skip and embeddings.

    `clip` is the text encoder (our CLIP or a drop-in with the same call), fetched through `get_clip`
    when it is needed so a pipeline can move it between devices.
    """

    def __init__(
        self,
        get_clip: Callable[[], object],
        tokenizer: object,
        embeddings: Embeddings | None = None,
        clip_skip: int = 1,
        emphasis: str = "Original",
        comma_backtrack: int = COMMA_BACKTRACK,
        device: torch.device | str = "cpu",
    ):
        check_emphasis(emphasis)
        self.get_clip = get_clip
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.clip_skip = clip_skip
        self.emphasis = emphasis
        self.comma_backtrack = comma_backtrack
        self.device = torch.device(device)

    def tokenize(self, text: str) -> TokenizedPrompt:
        return tokenize_prompt(text, self.tokenizer, self.embeddings, self.emphasis, self.comma_backtrack)

    @torch.no_grad()
    def encode_groups(self, groups: Sequence[Sequence[str]]) -> tuple[list[torch.Tensor], list[Embedding]]:
        """One (len(group), 77·k, width) float32 tensor per group, and the embeddings used.

        A group is what A1111 encodes in one call (a prompt's schedule variants): its texts are padded to
        the same number of chunks with empty ones, and "Original" emphasis restores the mean over the
        group. All chunks of all groups go through CLIP in one batch.
        """
        tokenized = {text: self.tokenize(text) for group in groups for text in group}
        empty = _empty_chunk(self.tokenizer.bos_token_id, self.tokenizer.eos_token_id)
        rows: dict[tuple, int] = {}  # distinct chunks -> row of the CLIP batch
        row_chunks: list[Chunk] = []
        layout: list[list[list[tuple[int, Chunk]]]] = []  # group -> chunk index -> (row, chunk) per text
        for group in groups:
            chunk_count = max(len(tokenized[text].chunks) for text in group)
            positions = []
            for index in range(chunk_count):
                column = []
                for text in group:
                    chunks = tokenized[text].chunks
                    chunk = chunks[index] if index < len(chunks) else empty
                    key = (tuple(chunk.tokens), tuple((o, id(e)) for o, e in chunk.fixes))
                    if key not in rows:
                        rows[key] = len(row_chunks)
                        row_chunks.append(chunk)
                    column.append((rows[key], chunk))
                positions.append(column)
            layout.append(positions)

        z = self._encode_chunks(row_chunks)
        out = []
        for positions in layout:
            parts = []
            for column in positions:
                index = torch.tensor([row for row, _ in column], device=z.device)
                multipliers = torch.tensor([chunk.multipliers for _, chunk in column], dtype=torch.float32)
                parts.append(apply_emphasis(z[index], multipliers.to(z.device), self.emphasis))
            out.append(torch.cat(parts, dim=1))
        used: dict[int, Embedding] = {}
        for text in tokenized.values():
            for embedding in text.embeddings:
                used.setdefault(id(embedding), embedding)
        return out, list(used.values())

    def _encode_chunks(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        clip = self.get_clip()
        tokens = torch.tensor([chunk.tokens for chunk in chunks], device=self.device)
        token_embeds = None
        if any(chunk.fixes for chunk in chunks):
            token_embeds = clip.token_embeddings(tokens)
            for row, chunk in enumerate(chunks):
                for offset, embedding in chunk.fixes:
                    count = min(tokens.shape[1] - offset - 1, len(embedding))
                    vectors = embedding.vectors[:count].to(token_embeds)
                    token_embeds[row, offset + 1 : offset + 1 + count] = vectors
        return clip(tokens, clip_skip=self.clip_skip, token_embeds=token_embeds).float()


# --- a whole generation's conditioning --------------------------------------------------------------------


@dataclass
class ScheduledConditioning:
    """One prompt's conditioning over a run: `tensors[i]` (77·k, width) is used up to model call `ends[i]`."""

    ends: list[int]
    tensors: torch.Tensor  # (variants, 77·k, width)

    def at(self, call: int) -> torch.Tensor:
        return self.tensors[schedule_index(self.ends, call)]

    @property
    def length(self) -> int:
        return self.tensors.shape[1]


@dataclass
class Conditioning:
    """What guidance needs for a run: the negative prompt's conditioning, the AND parts of the prompt with
    their weights, and (for "Pad conds") the empty prompt's."""

    uncond: ScheduledConditioning
    parts: list[tuple[ScheduledConditioning, float]]
    empty: torch.Tensor | None = None  # (77, width)
    embeddings: list[Embedding] = field(default_factory=list)


def condition(
    encoder: PromptEncoder, prompt: str, negative_prompt: str, total_steps: int, pad_conds: bool = False,
    old_scheduling: bool = False, hires_steps: int | None = None,
) -> Conditioning:  # fmt: skip
    """The conditioning of a run of `total_steps` schedule steps (A1111's steps, doubled for second-order
    samplers; `old_scheduling`: prompt-editing steps as A1111 counted them before v1.6; `hires_steps`: a
    hires pass of that many, after a first pass of `total_steps`, see prompt_schedule). `prompt` has its
    <lora:...> tags already taken out; the negative prompt is not split on AND. The text encoder runs once,
    over every distinct text."""
    parts = split_and(prompt)
    texts = [negative_prompt] + [text for text, _ in parts]
    distinct = list(dict.fromkeys(texts))
    schedules = {
        text: prompt_schedule(text, total_steps, hires_steps=hires_steps, old_scheduling=old_scheduling)
        for text in distinct
    }
    groups = [[variant for _, variant in schedules[text]] for text in distinct]
    if pad_conds:
        groups.append([""])
    tensors, used = encoder.encode_groups(groups)
    scheduled = {
        text: ScheduledConditioning([end for end, _ in schedules[text]], tensor)
        for text, tensor in zip(distinct, tensors[: len(distinct)], strict=True)
    }
    return Conditioning(
        uncond=scheduled[negative_prompt],
        parts=[(scheduled[text], weight) for text, weight in parts],
        empty=tensors[-1][0] if pad_conds else None,
        embeddings=used,
    )


__all__ = [
    "CHUNK_LENGTH",
    "EMPHASIS_MODES",
    "Chunk",
    "Conditioning",
    "PromptEncoder",
    "ScheduledConditioning",
    "TokenizedPrompt",
    "apply_emphasis",
    "check_emphasis",
    "condition",
    "tokenize_prompt",
]
