"""Architecture configs. SD1.5 is one instance; TINY is the same code at toy size for tests."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class CLIPConfig:
    """CLIP ViT-L/14 text transformer (the SD1.x conditioning model)."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class VAEConfig:
    """KL autoencoder: image (in_channels) <-> latent (latent_channels), downsampled 2**(levels-1)."""

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """Noise-prediction U-Net (original openaimodel.UNetModel layout)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = full resolution) with transformers
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    # Not architecture: the latent side the model was trained at (diffusers' name). Times the VAE's
    # downscale it is the image side generated when none is asked for (SD1.5: 64 -> 512 px).
    sample_size: int = 64

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class ScheduleConfig:
    """DDPM training noise schedule ("scaled_linear": betas = linspace(sqrt(start), sqrt(end), T)**2)
    and what the U-Net predicts at each step: the noise eps (SD1.x), or v = sqrt(abar) eps - sqrt(1 - abar) x0
    (Salimans & Ho 2022; SD2's 768 px models), whose scale stays ~1 at every noise level."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # one of PREDICTION_TYPES (diffusers' names)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction type {self.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}"
            )


@dataclass(frozen=True)
class ModelConfig:
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (SD1.5: 512): the default output size."""
        return self.unet.sample_size * self.vae.downscale

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)

        def build(kind: type, values: dict) -> object:
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        return cls(
            clip=build(CLIPConfig, raw["clip"]),
            vae=build(VAEConfig, raw["vae"]),
            unet=build(UNetConfig, raw["unet"]),
            schedule=build(ScheduleConfig, raw.get("schedule", {})),
        )


SD15 = ModelConfig()
# sd-v1-5-inpainting: the U-Net also takes the mask and the masked image's latents (4 + 1 + 4 channels).
SD15_INPAINTING = ModelConfig(unet=UNetConfig(in_channels=9))

# Same code, toy sizes: every structural feature of SD1.5 (4 VAE levels, 8x downscale, attention at
# some U-Net levels but not the last, channel changes, skip convs) is kept so tests cover the real paths.
TINY = ModelConfig(
    clip=CLIPConfig(width=32, layers=2, heads=4, mlp_width=64),
    vae=VAEConfig(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        num_heads=2,
        context_dim=32,
        norm_groups=8,
    ),
)
