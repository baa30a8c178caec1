"""`sd train`: train a latent diffusion model of our architecture on a folder of captioned images.

Two stages, each a run of the same loop over the same data:

* vae:  the autoencoder alone learns to reconstruct the images (MSE or L1, plus a small KL term). The
        std of its latents sets the scaling factor stored in the saved config, as SD measured 0.18215.
* unet: the U-Net learns to predict the noise added to the frozen VAE's scaled latents (epsilon MSE),
        conditioned on the text encoder, which trains along with it when it starts fresh. Captions are
        sometimes dropped to "" so that the same model also predicts unconditionally, which classifier-
        free guidance needs.

Every checkpoint is an original-layout .safetensors holding the EMA weights (what sampling uses) and the
model config, so `sd generate --ckpt` takes it directly; the raw weights, optimizer and step needed to
resume sit beside it in NAME.train-state.pt. Fine-tuning a real SD1.5 file is the unet stage with --init.

Data-parallel training is the same code under torchrun: the only distributed parts are the process group,
a DistributedSampler, the DistributedDataParallel wrapper and rank 0 doing the writing.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .config import (
    PREDICTION_TYPES,
    SD15,
    TINY,
    CLIPConfig,
    ModelConfig,
    ScheduleConfig,
    UNetConfig,
    VAEConfig,
)
from .datasets import CaptionedImages, read_captioned_folder, shorter_side
from .ema import EMA
from .images import tensor_to_uint8
from .models import COMPONENTS, build_models, config_of
from .samplers.schedule import alphas_cumprod
from .tokenizer import CLIPTokenizer

# ---------------------------------------------------------------------------------------------------------
# Model presets. SHAPES is the built-in model: 64 px images and a 2x VAE, so that even a small shape
# (11.5 px) covers ~6x6 latent pixels; a 4x VAE learns to redraw small stars and crosses as blobs for a long
# time. The U-Net and text encoder are small enough to ship in fp16 under 20 MB (a third of it is the
# 49408-word embedding table the tokenizer needs) and to train on a 2-core CPU at ~2.7 steps/s (batch 32).

SHAPES = ModelConfig(
    clip=CLIPConfig(width=64, layers=3, heads=4, mlp_width=256),
    # One normalisation group: GroupNorm removes each group's spatial mean, and on flat-coloured images
    # the background colour then survives only as contrasts between a group's channels; with all
    # channels in one group it survives as a pattern across them, and the VAE learns far faster.
    vae=VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=1),
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=1,
        attention_levels=(2, 3),
        num_heads=4,
        context_dim=64,
        norm_groups=1,
        sample_size=32,  # 64 px images
    ),
    # A noisier end of the schedule than SD's (abar at t=999: 2.3e-4 instead of 4.7e-3). These images are
    # mostly flat background, so a latent's per-channel mean carries most of its variance; under SD's
    # schedule that mean still shows through the noise at t=999 (SNR ~4 for the mean over 32x32 latents),
    # the model learns to read the background colour off the starting noise instead of the caption, and
    # its samples get the seed's colour (measured: background right 15-20% of the time). Samplers follow
    # the schedule stored in the checkpoint. The U-Net predicts v, which weighs the noisy steps that fix
    # layout and colour fully, as SD's noise prediction does not (see DiffusionLoss).
    schedule=ScheduleConfig(beta_end=0.02, prediction_type="v_prediction"),
)
PRESETS: dict[str, ModelConfig] = {"shapes": SHAPES, "tiny": TINY, "sd15": SD15}
STAGES = ("vae", "unet")
RECON_LOSSES = ("mse", "edge", "l1")


def resolve_model_config(name: str) -> ModelConfig:
    """A preset name (shapes, tiny, sd15) or the path of a JSON file in `ModelConfig.to_json` form."""
    if name in PRESETS:
        return PRESETS[name]
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(PRESETS)} or a JSON config file")
    try:
        return ModelConfig.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{path}: not a model config ({error})") from None


# ---------------------------------------------------------------------------------------------------------
# Settings.


@dataclass
class TrainConfig:
    """Everything `sd train` takes; the CLI flags map one to one onto these fields."""

    data: str  # folder of captioned images
    output: str = "model.safetensors"
    stage: str = "unet"  # "vae" or "unet"
    model: str | None = None  # preset or JSON config, for a model that starts fresh
    init: str | None = None  # start every component from this checkpoint (fine-tuning)
    vae: str | None = None  # unet stage: take the frozen VAE from this checkpoint, the rest fresh
    resume: str | None = None  # continue the run that wrote this checkpoint
    train_text_encoder: bool = False  # also train a text encoder loaded with --init
    prediction_type: str | None = None  # what the U-Net learns to predict; None: the model's own
    resolution: int | None = None  # training image side; default: the first image's shorter side
    steps: int = 1000  # total optimizer steps (a resumed run continues up to this)
    batch_size: int = 16  # per process
    lr: float = 1e-4
    text_lr_scale: float = 1.0  # the text encoder's learning rate as a multiple of `lr`
    lr_schedule: str = "constant"  # after warm-up: "constant" or "cosine" (to 0 at `steps`)
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float | None = None  # Min-SNR loss weighting (Hang et al. 2023); None = plain MSE
    v_loss: bool = False  # weight the epsilon MSE by 1 / abar_t: v-prediction's loss (see DiffusionLoss)
    offset_noise: float = 0.0  # std of a per-channel constant added to the noise
    kl_weight: float = 1e-6
    recon_loss: str = "mse"  # vae stage: "mse", "edge" (MSE weighted up at edges) or "l1"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    gradient_checkpointing: bool = False
    cache_latents: bool = True  # unet stage: encode the dataset once instead of every step
    save_every: int = 1000
    sample_every: int = 500  # 0 = never
    sample_prompts: tuple[str, ...] = ()  # default: the first captions of the dataset
    sample_steps: int = 20
    sample_cfg: float = 7.5
    save_dtype: str = "fp32"  # "fp32", "fp16" or "bf16" for the .safetensors (state file stays fp32)
    seed: int = 0
    device: str | None = None  # default: cuda if available, else cpu
    threads: int | None = None  # torch CPU threads
    num_workers: int = 0  # DataLoader worker processes
    progress: bool = True


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def state_path(checkpoint: str | Path) -> Path:
    """Where the training state of a checkpoint lives: NAME.train-state.pt beside NAME.safetensors."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".train-state.pt")


def log_path(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + ".log.jsonl")


def samples_dir(checkpoint: str | Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + "-samples")


# ---------------------------------------------------------------------------------------------------------
# Processes and devices. Under torchrun (RANK/WORLD_SIZE set) this joins the process group; alone it is a
# group of one and nothing distributed is created.


@dataclass(frozen=True)
class Workers:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start_workers(device: str | None) -> Workers:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", local_rank)  # one GPU per process
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Workers(rank, world_size, target)


# ---------------------------------------------------------------------------------------------------------
# Models: where each component starts, which ones train.


@torch.no_grad()
def init_fresh_weights_(models: dict[str, nn.Module], names: Sequence[str]) -> None:
    """The original initialisation where it differs from PyTorch's defaults.

    The U-Net's residual branches end in zero convs (openaimodel's zero_module), so every block starts as
    the identity and the model starts out predicting zero noise; CLIP embeddings start small (std 0.02)
    rather than at nn.Embedding's N(0, 1), as in CLIP. A fresh VAE encoder starts with a nearly
    deterministic posterior (std ~0.02): at the default std ~1 the sampled noise drowns everything
    that covers only a few latent pixels, and the VAE learns backgrounds but not small shapes for a long
    time; the KL term widens the posterior again as far as reconstructions allow.
    """
    if "encoder" in names:
        quant_conv = models["encoder"].quant_conv
        logvar = slice(quant_conv.out_channels // 2, None)
        quant_conv.weight[logvar].mul_(0.1)
        quant_conv.bias[logvar].fill_(-8.0)
    if "diffusion" in names:
        unet = models["diffusion"]
        for name, module in unet.named_modules():
            if name.endswith(("out_layers.3", "proj_out")) or name == "out.2":
                nn.init.zeros_(module.weight)
                nn.init.zeros_(module.bias)
    if "clip" in names:
        embeddings = models["clip"].text_model.embeddings
        nn.init.normal_(embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(embeddings.position_embedding.weight, std=0.01)


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def enable_gradient_checkpointing(unet: nn.Module) -> None:
    """Recompute each U-Net block's activations in the backward pass instead of storing them.

    Patches the blocks' `forward` from outside, so the model code and its state dict stay as they are.
    Copies made earlier (the EMA) are unaffected; do not deep-copy the patched module.
    """
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        block.forward = functools.partial(_checkpointed, block.forward)


def set_scaling_factor(models: dict[str, nn.Module], config: ModelConfig, factor: float) -> ModelConfig:
    """Give the VAE a new scaling factor: in the config that is saved and in the live modules."""
    vae = replace(config.vae, scaling_factor=float(factor))
    for name in ("encoder", "decoder"):
        models[name].config = vae
    return replace(config, vae=vae)


def _load(path: str) -> tuple[dict[str, nn.Module], ModelConfig]:
    from .weights import load_models

    models = load_models(path, dtype=torch.float32)
    return models, config_of(models)


def start_models(cfg: TrainConfig) -> tuple[dict[str, nn.Module], ModelConfig, list[str]]:
    """The four components as this run starts them, the config they follow, and the names that train."""
    if cfg.stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {cfg.stage!r}")
    if cfg.resume and (cfg.init or cfg.model or cfg.vae):
        raise ValueError("--resume takes the model from the checkpoint: drop --init, --model and --vae")
    if cfg.init and (cfg.model or cfg.vae):
        raise ValueError("--init takes the whole model from the checkpoint: drop --model and --vae")
    if cfg.vae and cfg.stage != "unet":
        raise ValueError("--vae is for the unet stage (the VAE stage trains one)")
    if cfg.resume:
        models, config = _load(cfg.resume)
        if cfg.prediction_type not in (None, config.schedule.prediction_type):
            predicts = config.schedule.prediction_type
            raise ValueError(f"{cfg.resume} predicts {predicts}: drop --prediction-type")
        return models, config, []  # the trained names come from the state file
    if cfg.init:
        models, config = _load(cfg.init)
        fresh: list[str] = []
    else:
        if cfg.model is None:
            raise ValueError(
                f"a model that starts fresh needs --model ({', '.join(PRESETS)} or a JSON config file)"
            )
        config = resolve_model_config(cfg.model)
        torch.manual_seed(cfg.seed)  # every rank builds the same weights
        models = build_models(config)
        fresh = list(COMPONENTS)
        if cfg.vae:
            loaded, loaded_config = _load(cfg.vae)
            if loaded_config.vae.latent_channels != config.unet.in_channels:
                raise ValueError(
                    f"--vae has {loaded_config.vae.latent_channels} latent channels, "
                    f"the U-Net takes {config.unet.in_channels}"
                )
            models["encoder"], models["decoder"] = loaded["encoder"], loaded["decoder"]
            config = replace(config, vae=loaded_config.vae)
            fresh = ["clip", "diffusion"]
        elif cfg.stage == "unet":
            print(
                "warning: the U-Net will learn the latents of an untrained VAE (see --vae)", file=sys.stderr
            )
        init_fresh_weights_(models, fresh)
    if cfg.prediction_type not in (None, config.schedule.prediction_type):
        # Switching a loaded model's parameterisation is a fine-tune like any other (SD2's 768 px
        # v-model started from its eps base): the U-Net relearns its output, the rest carries over.
        config = replace(config, schedule=replace(config.schedule, prediction_type=cfg.prediction_type))
        models["diffusion"].schedule = config.schedule
    if cfg.stage == "vae":
        trained = ["encoder", "decoder"]
    else:
        trained = ["diffusion"] + (["clip"] if "clip" in fresh or cfg.train_text_encoder else [])
    return models, config, trained


# ---------------------------------------------------------------------------------------------------------
# What each stage minimises. Each is one module so DistributedDataParallel can wrap it whole.


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element, averaged."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def edge_weights(pixels: torch.Tensor, boost: float = 5.0, threshold: float = 0.1) -> torch.Tensor:
    """(B, 1, H, W): 1 + `boost` on pixels next to an edge of the image (a 4-neighbour differs by more than
    `threshold` in some channel, on the [-1, 1] scale), 1 elsewhere."""
    dx = (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().amax(dim=1, keepdim=True) > threshold
    dy = (pixels[..., 1:, :] - pixels[..., :-1, :]).abs().amax(dim=1, keepdim=True) > threshold
    edge = F.pad(dx, (0, 1)) | F.pad(dx, (1, 0)) | F.pad(dy, (0, 0, 0, 1)) | F.pad(dy, (0, 0, 1, 0))
    return 1.0 + boost * edge.float()


def reconstruction_error(decoded: torch.Tensor, pixels: torch.Tensor, kind: str) -> torch.Tensor:
    """How far a reconstruction is from its image.

    "mse": L1's gradient keeps full size on pixels that are already nearly right, so on images that are
    mostly flat background its noise drowns the few pixels of small objects and training stalls with the
    objects missing; MSE's gradient fades where the error does. "edge": MSE with edge pixels weighted 6x
    (normalised per batch), because outlines are what tells a small star from a blob but are few pixels.
    """
    if kind == "l1":
        return F.l1_loss(decoded, pixels)
    if kind == "mse":
        return F.mse_loss(decoded, pixels)
    weights = edge_weights(pixels)
    return (weights * (decoded - pixels).pow(2)).mean() / weights.mean()


class VAELoss(nn.Module):
    """Reconstruction error of the image through a sampled latent, plus `kl_weight` * KL to N(0, 1)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, kl_weight: float, recon_loss: str = "mse"):
        super().__init__()
        self.encoder, self.decoder, self.kl_weight, self.recon_loss = encoder, decoder, kl_weight, recon_loss

    def forward(self, pixels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        posterior = self.encoder.encode(pixels)
        latents = posterior.mean + posterior.std * noise
        # The decoder's inner layers take unscaled latents; its forward() would divide by the scaling
        # factor, which is only measured after training.
        decoded = self.decoder.decoder(self.decoder.post_quant_conv(latents))
        return reconstruction_error(
            decoded.float(), pixels, self.recon_loss
        ) + self.kl_weight * kl_divergence(posterior.mean.float(), posterior.logvar.float())


class DiffusionLoss(nn.Module):
    """MSE of the U-Net's prediction at uniformly drawn timesteps, optionally Min-SNR weighted.

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, and the U-Net, given x_t, t and the text, predicts eps
    or, for a v-prediction model, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0. Measured on the clean image,
    eps MSE weights errors by SNR_t (~0.005 at t=999: the noisy steps where layout and colours are decided
    barely count) and v MSE by SNR_t + 1 (they count fully), and v keeps the target's scale ~1 everywhere.
    Min-SNR-gamma reweights either to min(SNR_t, gamma) (Hang et al. 2023), so the many nearly-clean
    timesteps stop dominating the gradient.

    `v_loss` weights the eps MSE by 1 / abar_t, which is v's weighting for an eps-predicting model. Its
    gradients at the noisiest steps are ~1/abar_t (4,300 at t=999 of the shapes schedule) times those of the
    clean steps, so a small model learns fine detail slowly under it; a v-prediction model has v's
    weighting without that imbalance.
    """

    def __init__(
        self,
        clip: nn.Module,
        unet: nn.Module,
        abar: torch.Tensor,
        min_snr_gamma: float | None,
        v_loss: bool = False,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if min_snr_gamma is not None and v_loss:
            raise ValueError("choose one loss weighting: min-SNR or v")
        if v_loss and prediction_type != "epsilon":
            raise ValueError("--v-loss reweights an eps-prediction model; v-prediction has it built in")
        self.clip, self.unet, self.min_snr_gamma, self.v_loss = clip, unet, min_snr_gamma, v_loss
        self.prediction_type = prediction_type
        self.register_buffer("abar", abar, persistent=False)

    def forward(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        abar = self.abar[timesteps].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.clip.training):
            context = self.clip(tokens)
        predicted = self.unet(noisy, context, timesteps)
        if self.prediction_type == "v_prediction":
            target = abar.sqrt() * noise - (1 - abar).sqrt() * latents
        else:
            target = noise
        per_sample = (predicted.float() - target).pow(2).mean(dim=(1, 2, 3))
        abar = abar.view(-1)
        if self.min_snr_gamma is not None:
            snr = abar / (1 - abar)
            inherent = snr + 1 if self.prediction_type == "v_prediction" else snr  # weight on x0 errors
            per_sample = per_sample * snr.clamp(max=self.min_snr_gamma) / inherent
        if self.v_loss:
            per_sample = per_sample / abar
        return per_sample.mean()


# ---------------------------------------------------------------------------------------------------------
# Data.


@torch.no_grad()
def encode_dataset(
    encoder: nn.Module, images: Dataset, device: torch.device, batch_size: int = 64, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled latent means and stds of every image: the VAE is frozen, so they never change."""
    from tqdm import tqdm

    means, stds = [], []
    loader = DataLoader(images, batch_size=batch_size, shuffle=False)
    for pixels, _ in tqdm(
        loader, desc="encoding images", unit="batch", disable=not progress, file=sys.stderr
    ):
        posterior = encoder.encode(pixels.to(device))
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    # Randomness of a step depends only on (seed, rank, step), so a resumed run draws the same numbers.
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def endless_batches(loader: DataLoader, sampler: DistributedSampler, start_step: int) -> Iterator:
    """The loader's batches epoch after epoch, starting where step `start_step` of the run was."""
    per_epoch = len(loader)
    epoch, skip = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)  # reshuffles, the same on every rank
        yield from itertools.islice(loader, skip, None)
        epoch, skip = epoch + 1, 0


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant or a cosine down to zero at `steps`."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * warm


# ---------------------------------------------------------------------------------------------------------
# Checkpoints, samples, logs (rank 0 only).


@torch.no_grad()
def measure_scaling_factor(
    encoder: nn.Module, images: Dataset, device: torch.device, count: int = 256
) -> float:
    """1 / std of sampled latents over the first `count` images, so scaled latents have unit variance."""
    subset = torch.utils.data.Subset(images, range(min(count, len(images))))
    generator = torch.Generator().manual_seed(0)
    samples = []
    for pixels, _ in DataLoader(subset, batch_size=32):
        samples.append(encoder.encode(pixels.to(device)).sample(generator).float().cpu())
    return float(1.0 / torch.cat(samples).std())


def save_training(
    path: Path,
    models: dict[str, nn.Module],
    config: ModelConfig,
    emas: dict[str, EMA],
    optimizer: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
) -> None:
    """The checkpoint (EMA weights in the original layout) and, beside it, the state to resume from."""
    from .weights import save_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {name: emas[name].shadow if name in emas else module for name, module in models.items()}
    # Written under temporary names and renamed, so an interrupted save never leaves half a file.
    partial = path.with_name(path.name + ".partial")
    save_checkpoint(saved, partial, config=config, dtype=DTYPES[cfg.save_dtype])
    state = {
        "step": step,
        "stage": cfg.stage,
        "trained": list(emas),
        "models": {name: models[name].state_dict() for name in emas},
        "ema": {name: ema.state_dict() for name, ema in emas.items()},
        "optimizer": optimizer.state_dict(),
        "model_config": config.to_json(),
        "train_config": {**asdict(cfg), "sample_prompts": list(cfg.sample_prompts)},
    }
    partial_state = state_path(path).with_name(state_path(path).name + ".partial")
    torch.save(state, partial_state)
    os.replace(partial, path)
    os.replace(partial_state, state_path(path))


def load_training_state(checkpoint: str | Path) -> dict:
    path = state_path(checkpoint)
    if not path.is_file():
        raise ValueError(f"cannot resume: no training state {path} beside {checkpoint}")
    return torch.load(path, map_location="cpu", weights_only=True)


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), (0, 0, 0))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


@torch.no_grad()
def sample_grid(
    models: dict[str, nn.Module], cfg: TrainConfig, prompts: Sequence[str], size: int, device: torch.device
) -> Image.Image:
    """One image per prompt (seeds 0, 1, ...) from the EMA models through the normal pipeline."""
    from .pipeline import Pipeline

    pipe = Pipeline(models, device=device)
    images = [
        pipe.txt2img(
            prompt, width=size, height=size, steps=cfg.sample_steps, cfg_scale=cfg.sample_cfg, seed=i
        )[0]
        for i, prompt in enumerate(prompts)
    ]
    return image_grid(images, columns=min(len(images), 8))


@torch.no_grad()
def reconstruction_grid(
    encoder: nn.Module, decoder: nn.Module, images: Dataset, device: torch.device, count: int = 8
) -> Image.Image:
    """Inputs (top row) and their VAE reconstructions from the latent means (bottom row)."""
    pixels = torch.stack([images[i][0] for i in range(min(count, len(images)))]).to(device)
    mean = encoder.encode(pixels).mean
    decoded = decoder.decoder(decoder.post_quant_conv(mean))
    rows = [tensor_to_uint8(pixels), tensor_to_uint8(decoded)]
    return image_grid([Image.fromarray(a) for row in rows for a in row], columns=len(pixels))


# ---------------------------------------------------------------------------------------------------------
# The loop.


@dataclass
class TrainResult:
    """What a run returns: its checkpoint, the last step, this process's per-step losses, the models (EMA
    weights where trained, as saved; `online` holds the raw trained modules), config and optimizer."""

    checkpoint: Path
    step: int
    losses: list[float]
    models: dict[str, nn.Module]
    online: dict[str, nn.Module]
    config: ModelConfig
    optimizer: torch.optim.Optimizer


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training stage as `cfg` says; rank 0 writes the checkpoint(s) to `cfg.output`."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.save_dtype not in DTYPES:
        raise ValueError(f"save dtype must be one of {', '.join(DTYPES)}, got {cfg.save_dtype!r}")
    if cfg.recon_loss not in RECON_LOSSES:
        raise ValueError(
            f"reconstruction loss must be one of {', '.join(RECON_LOSSES)}, got {cfg.recon_loss!r}"
        )
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule must be constant or cosine, got {cfg.lr_schedule!r}")
    workers = start_workers(cfg.device)
    try:
        result = _train(cfg, workers, Path(cfg.output))
        if workers.distributed:
            dist.barrier()  # every rank returns after rank 0 has written the checkpoint
        return result
    finally:
        if workers.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, workers: Workers, output: Path) -> TrainResult:
    device = workers.device
    models, config, trained = start_models(cfg)
    resume_state = load_training_state(cfg.resume) if cfg.resume else None
    if resume_state is not None:
        if resume_state["stage"] != cfg.stage:
            raise ValueError(
                f"{cfg.resume} was written by the {resume_state['stage']} stage, not {cfg.stage}"
            )
        trained = list(resume_state["trained"])
    for name, model in models.items():
        model.to(device).train(name in trained).requires_grad_(name in trained)

    # Data. Sizes must suit the VAE (a multiple of its downscale).
    items = read_captioned_folder(cfg.data)
    size = cfg.resolution or shorter_side(items[0].path)
    size -= size % config.vae.downscale
    if size < config.vae.downscale:
        raise ValueError(f"resolution must be at least {config.vae.downscale}, got {size}")
    images = CaptionedImages(items, size)
    # The training side becomes the model's native size, what `sd generate` makes when not told a size.
    config = replace(config, unet=replace(config.unet, sample_size=size // config.vae.downscale))
    models["diffusion"].config = config.unet
    tokenizer = CLIPTokenizer()
    empty_tokens = tokenizer([""])[0]
    if cfg.stage == "unet" and cfg.cache_latents:
        means, stds = encode_dataset(
            models["encoder"], images, device, progress=cfg.progress and workers.main
        )
        dataset: Dataset = TensorDataset(means, stds, tokenizer(images.captions))
    else:
        dataset = images
    if len(dataset) < cfg.batch_size * workers.world_size:
        raise ValueError(
            f"{len(dataset)} images cannot fill a batch of {cfg.batch_size} on {workers.world_size} processes"
        )
    sampler = DistributedSampler(
        dataset,
        num_replicas=workers.world_size,
        rank=workers.rank,
        shuffle=True,
        seed=cfg.seed,
        drop_last=True,
    )
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, num_workers=cfg.num_workers
    )

    # What is optimised, its EMA, and the optimizer.
    if cfg.stage == "vae":
        objective: nn.Module = VAELoss(models["encoder"], models["decoder"], cfg.kl_weight, cfg.recon_loss)
    else:
        abar = alphas_cumprod(config.schedule).to(device)
        objective = DiffusionLoss(
            models["clip"],
            models["diffusion"],
            abar,
            cfg.min_snr_gamma,
            cfg.v_loss,
            config.schedule.prediction_type,
        )
    emas = {name: EMA(models[name], cfg.ema_decay) for name in trained}
    params = [p for name in trained for p in models[name].parameters()]
    # One parameter group per component, each with its multiple of the scheduled learning rate (taken
    # from this run's settings, not from a resumed optimizer state).
    groups = [{"params": list(models[name].parameters())} for name in trained]
    lr_scales = [cfg.text_lr_scale if name == "clip" else 1.0 for name in trained]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if resume_state is not None:
        for name in trained:
            models[name].load_state_dict(resume_state["models"][name])
            emas[name].load_state_dict(resume_state["ema"][name])
        optimizer.load_state_dict(resume_state["optimizer"])
        step = int(resume_state["step"])
    if cfg.gradient_checkpointing and "diffusion" in trained:
        enable_gradient_checkpointing(models["diffusion"])  # after the EMA copy was taken
    if workers.distributed:
        objective = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )

    prompts = list(cfg.sample_prompts) or images.captions[:4]
    saved = {name: emas[name].shadow if name in emas else module for name, module in models.items()}

    def save(at_step: int) -> None:
        nonlocal config
        if cfg.stage == "vae":
            # Measured on the EMA encoder, which is what gets saved.
            factor = measure_scaling_factor(emas["encoder"].shadow, images, device)
            config = set_scaling_factor(models, config, factor)
            set_scaling_factor(saved, config, factor)
        save_training(output, models, config, emas, optimizer, at_step, cfg)

    def write_samples(at_step: int) -> None:
        folder = samples_dir(output)
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.stage == "vae":
            grid = reconstruction_grid(saved["encoder"], saved["decoder"], images, device)
        elif size < 64:
            return  # the pipeline's smallest image
        else:
            grid = sample_grid(saved, cfg, prompts, size, device)
        grid.save(folder / f"step-{at_step:07d}.png")

    from tqdm import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=step,
        desc=f"train {cfg.stage}",
        unit="step",
        disable=not (cfg.progress and workers.main),
        file=sys.stderr,
        dynamic_ncols=True,
    )
    # Line-buffered, so the log can be read while training runs.
    log = log_path(output).open("a", buffering=1) if workers.main else None
    autocast = functools.partial(
        torch.autocast, device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"
    )
    losses: list[float] = []
    running = None
    last_saved = step
    batches = endless_batches(loader, sampler, step)
    try:
        while step < cfg.steps:
            generator = _step_generator(cfg.seed, workers.rank, step)
            batch = next(batches)
            if cfg.stage == "vae":
                pixels = batch[0].to(device)
                noise = torch.randn(
                    (pixels.shape[0], config.vae.latent_channels, size // config.vae.downscale,
                     size // config.vae.downscale), generator=generator,
                )  # fmt: skip
                inputs: tuple = (pixels, noise.to(device))
            else:
                inputs = diffusion_inputs(
                    batch, models["encoder"], tokenizer, empty_tokens, config, cfg, generator
                )
                inputs = tuple(x.to(device) for x in inputs)

            for group, scale in zip(optimizer.param_groups, lr_scales, strict=True):
                group["lr"] = learning_rate(cfg, step) * scale
            with autocast():
                loss = objective(*inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            for name, ema in emas.items():
                ema.update(models[name])
            step += 1

            value = float(loss.detach())
            losses.append(value)
            running = value if running is None else 0.98 * running + 0.02 * value
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{learning_rate(cfg, step - 1):.2e}", refresh=False)
            bar.update()
            if log is not None:
                log.write(
                    json.dumps({"step": step, "loss": round(value, 6), "time": round(time.time(), 2)}) + "\n"
                )
            if workers.main and cfg.sample_every and step % cfg.sample_every == 0:
                write_samples(step)
            if workers.main and (step % cfg.save_every == 0 or step == cfg.steps):
                save(step)
                last_saved = step
    except KeyboardInterrupt:
        if workers.main and step > last_saved:
            bar.write(f"interrupted: saving step {step} to {output}")
            save(step)
        raise
    finally:
        bar.close()
        if log is not None:
            log.close()
    if workers.main and step > last_saved:  # e.g. a resumed run that was already at `steps`
        save(step)
    online = {name: models[name] for name in trained}
    return TrainResult(output, step, losses, saved, online, config, optimizer)


@torch.no_grad()
def diffusion_inputs(
    batch: Sequence,
    encoder: nn.Module,
    tokenizer: CLIPTokenizer,
    empty_tokens: torch.Tensor,
    config: ModelConfig,
    cfg: TrainConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scaled latents, noise, timesteps, tokens) for one unet-stage batch, all drawn from `generator`."""
    if cfg.cache_latents:
        mean, std, tokens = batch
    else:
        pixels, captions = batch
        posterior = encoder.encode(pixels.to(next(encoder.parameters()).device))
        mean, std, tokens = posterior.mean.cpu(), posterior.std.cpu(), tokenizer(list(captions))
    # A fresh VAE sample each time: the U-Net sees the latent distribution, not one point of it.
    latents = (mean + std * torch.randn(mean.shape, generator=generator)) * config.vae.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    if cfg.offset_noise:
        noise = noise + cfg.offset_noise * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    timesteps = torch.randint(
        0, config.schedule.num_train_timesteps, (latents.shape[0],), generator=generator
    )
    dropped = torch.rand(latents.shape[0], generator=generator) < cfg.caption_dropout
    tokens = torch.where(dropped[:, None], empty_tokens[None], tokens)
    return latents, noise, timesteps, tokens


# ---------------------------------------------------------------------------------------------------------
# Command line: `sd train`.

EXAMPLES = """examples:
  # the built-in shapes model, from scratch (see scripts/train_builtin.sh)
  sd make-shapes data/shapes --count 30000
  sd train data/shapes --stage vae  --model shapes -o vae.safetensors --steps 3000 --lr 1e-3
  sd train data/shapes --stage unet --model shapes --vae vae.safetensors -o shapes.safetensors \\
      --steps 8000 --batch-size 64 --lr 1e-3 --sample-every 1000
  sd generate "a red circle at the top left on a blue background" --ckpt shapes.safetensors \\
      --width 64 --height 64

  # carry on where a run stopped (weights, optimizer, EMA and step come from shapes.train-state.pt)
  sd train data/shapes --stage unet --resume shapes.safetensors -o shapes.safetensors --steps 12000

  # fine-tune SD1.5 (VAE and text encoder frozen) on 2 GPUs
  torchrun --nproc_per_node 2 -m sd train my-photos --init v1-5-pruned-emaonly.safetensors \\
      -o finetuned.safetensors --resolution 512 --batch-size 4 --lr 1e-5 --precision bf16 \\
      --gradient-checkpointing --save-dtype fp16

data: a folder with metadata.jsonl ({"file_name": ..., "text": ...} per line) or NAME.png + NAME.txt pairs.
Beside OUTPUT.safetensors go OUTPUT.train-state.pt (to resume), OUTPUT.log.jsonl (the loss per step)
and OUTPUT-samples/ (sample grids, or VAE reconstructions)."""


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = set(TrainConfig.__dataclass_fields__)
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if values.get("resume") is True:  # bare --resume: continue the output's own run
        values["resume"] = args.output
    values["sample_prompts"] = tuple(args.sample_prompts or ())
    return TrainConfig(**values)


def run_train(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(result.checkpoint)
    return 0


def add_train_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `train` to the `sd` command line; its `run` default returns the exit status."""
    defaults = TrainConfig(data="")
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model on a folder of captioned images",
        description="Train a latent diffusion model of this package's architecture: first the VAE "
        "(--stage vae), then the U-Net and text encoder on the frozen VAE's latents (--stage unet). Saves "
        "an original-layout .safetensors of the EMA weights that 'sd generate --ckpt' takes directly. "
        "Runs data-parallel under torchrun.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", metavar="DATA", help="folder of captioned images")
    parser.add_argument("-o", "--output", default=defaults.output, help="checkpoint to write (.safetensors)")
    parser.add_argument(
        "--stage", choices=STAGES, default=defaults.stage, help="what to train (default unet)"
    )
    start = parser.add_argument_group("where the model starts (one of)")
    start.add_argument(
        "--model", metavar="NAME|JSON", help=f"fresh model: {', '.join(PRESETS)} or a JSON config"
    )
    start.add_argument("--init", metavar="CKPT", help="start from a checkpoint (fine-tuning)")
    start.add_argument("--resume", metavar="CKPT", nargs="?", const=True, help="continue a run (bare: -o's)")
    start.add_argument("--vae", metavar="CKPT", help="unet stage of a fresh model: the trained VAE to use")
    start.add_argument(
        "--train-text-encoder", action="store_true", help="with --init: train the text encoder too"
    )
    start.add_argument(
        "--prediction-type",
        choices=PREDICTION_TYPES,
        help="what the U-Net learns to predict: the noise (SD1.5) or v (default: the model's own; the "
        "shapes preset predicts v). Given with --init, fine-tunes the model into the other kind",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument(
        "--steps", type=int, default=defaults.steps, help="total optimizer steps (default %(default)s)"
    )
    opt.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="per process (default %(default)s)"
    )
    opt.add_argument(
        "--lr", type=float, default=defaults.lr, help="AdamW learning rate (default %(default)s)"
    )
    opt.add_argument(
        "--text-lr-scale",
        type=float,
        default=defaults.text_lr_scale,
        help="the text encoder's learning rate as a multiple of --lr (default %(default)s)",
    )
    opt.add_argument("--lr-schedule", choices=("constant", "cosine"), default=defaults.lr_schedule)
    opt.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="(default %(default)s)")
    opt.add_argument(
        "--weight-decay", type=float, default=defaults.weight_decay, help="(default %(default)s)"
    )
    opt.add_argument(
        "--grad-clip",
        type=float,
        default=defaults.grad_clip,
        help="max gradient norm, 0 = off (default %(default)s)",
    )
    opt.add_argument("--ema-decay", type=float, default=defaults.ema_decay, help="(default %(default)s)")
    opt.add_argument(
        "--caption-dropout", type=float, default=defaults.caption_dropout,
        help="fraction of captions replaced by '' for CFG (default %(default)s)",
    )  # fmt: skip
    opt.add_argument("--min-snr-gamma", type=float, help="Min-SNR loss weighting, e.g. 5 (default off)")
    opt.add_argument(
        "--v-loss", action="store_true",
        help="eps-prediction models: weight the noise MSE by 1/abar_t, v-prediction's weighting (the noisy "
        "steps that fix layout and colours count fully); --prediction-type v_prediction does this better",
    )  # fmt: skip
    opt.add_argument(
        "--offset-noise", type=float, default=defaults.offset_noise, help="(default %(default)s)"
    )
    opt.add_argument(
        "--kl-weight", type=float, default=defaults.kl_weight, help="VAE stage (default %(default)s)"
    )
    opt.add_argument(
        "--recon-loss",
        choices=RECON_LOSSES,
        default=defaults.recon_loss,
        help="VAE stage: mse, edge (MSE weighted 6x on edge pixels) or l1 (default %(default)s)",
    )
    opt.add_argument("--seed", type=int, default=defaults.seed, help="(default %(default)s)")
    run = parser.add_argument_group("data and hardware")
    run.add_argument("--resolution", type=int, help="image side (default: the first image's shorter side)")
    run.add_argument(
        "--no-cache-latents", dest="cache_latents", action="store_false",
        help="encode images every step instead of once up front (large datasets)",
    )  # fmt: skip
    run.add_argument(
        "--precision", choices=("fp32", "bf16"), default=defaults.precision, help="bf16 = autocast"
    )
    run.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for U-Net memory")
    run.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    run.add_argument("--threads", type=int, help="torch CPU threads")
    run.add_argument("--num-workers", type=int, default=defaults.num_workers, help="DataLoader workers")
    out = parser.add_argument_group("output")
    out.add_argument("--save-every", type=int, default=defaults.save_every, help="(default %(default)s)")
    out.add_argument(
        "--save-dtype", choices=tuple(DTYPES), default=defaults.save_dtype, help="checkpoint dtype"
    )
    out.add_argument(
        "--sample-every", type=int, default=defaults.sample_every, help="sample grid every N steps, 0 = never"
    )
    out.add_argument(
        "--sample-prompt", dest="sample_prompts", action="append", metavar="TEXT",
        help="prompt for the sample grids (repeatable; default: the first 4 captions)",
    )  # fmt: skip
    out.add_argument("--sample-steps", type=int, default=defaults.sample_steps)
    out.add_argument("--sample-cfg", type=float, default=defaults.sample_cfg)
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.set_defaults(run=run_train)
    return parser
