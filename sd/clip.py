"""CLIP ViT-L/14 text transformer: token ids (B, 77) -> hidden states (B, 77, 768).

Attribute names mirror the checkpoint (`text_model.encoder.layers.N.self_attn.q_proj`, ...), so the
original file's `cond_stage_model.transformer.*` tensors load without renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import SelfAttention
from .config import CLIPConfig
from .kernels import Linear


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _embedding(count: int, width: int) -> nn.Embedding:
    """nn.Embedding, minus its init on the meta device (where the loader builds models): torch's
    `normal_` there imports ~800 modules on first use, 0.8 s of every model load."""
    weight = torch.empty(count, width)
    if not weight.is_meta:
        nn.init.normal_(weight)  # nn.Embedding's own init, same random draws
    return nn.Embedding(count, width, _weight=weight)


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.token_embedding = _embedding(config.vocab_size, config.width)
        self.position_embedding = _embedding(config.max_length, config.width)

    def forward(self, tokens: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`token_embeds` (B, T, width), when given, stand in for the looked-up token rows (textual
        inversion writes its vectors there); positions are added either way."""
        # Positions are recomputed, never read from the file: some merged checkpoints store
        # corrupted float `position_ids`.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        if token_embeds is None:
            token_embeds = self.token_embedding(tokens)
        return token_embeds + self.position_embedding(positions)


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.fc1 = Linear(config.width, config.mlp_width)
        self.activation = QuickGELU()
        self.fc2 = Linear(config.mlp_width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPLayer(nn.Module):
    """Pre-norm transformer layer with a causal self-attention."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config.width, config.heads, causal=True)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(config) for _ in range(config.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)


class CLIP(nn.Module):
    """The SD1.x text encoder. `clip(tokens)` is the last layer after the final layer norm."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def hidden_states(
        self, tokens: torch.Tensor, upto: int | None = None, token_embeds: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """[embeddings, layer 1, ..., layer `upto`] outputs, without the final layer norm."""
        x = self.text_model.embeddings(tokens, token_embeds)
        states = [x]
        for layer in self.text_model.encoder.layers[:upto]:
            x = layer(x)
            states.append(x)
        return states

    def forward(
        self, tokens: torch.Tensor, clip_skip: int = 1, token_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, T) int token ids -> (B, T, width). `clip_skip=2` uses the penultimate layer
        (A1111 "clip skip" convention: the final layer norm is still applied). `token_embeds`: see
        CLIPEmbeddings."""
        if not 1 <= clip_skip <= self.config.layers:
            raise ValueError(f"clip_skip must be in 1..{self.config.layers}, got {clip_skip}")
        upto = self.config.layers - clip_skip + 1
        return self.text_model.final_layer_norm(self.hidden_states(tokens, upto, token_embeds)[-1])

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, width): the rows `forward` looks up before adding positions."""
        return self.text_model.embeddings.token_embedding(tokens)
