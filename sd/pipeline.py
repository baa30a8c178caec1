"""Text-to-image and image-to-image generation.

`Pipeline` is the friendly object (PIL in, PIL out); `generate()` is the seed's function, kept with its
signature. Both run the same denoising loop, written once as a generator (`Pipeline.denoise`) that
yields after every model call, so progress bars, previews and cancellation need no plumbing.

Reproducibility follows diffusers' StableDiffusion(Img2Img)Pipeline: the same CPU generator, the same
order of random draws (img2img: the VAE sample, then the noise), the same shapes and dtypes, guidance
as uncond + scale * (cond - uncond) with the negative prompt first in the batch, and the decoded image
rounded to uint8.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .a1111_sampling import bind_a1111_sampler, sample_a1111
from .allocator import large_buffers_from_kernel, tune_malloc
from .checkpoints import (
    BUILTIN_MODEL,
    builtin_notice,
    default_embeddings_dir,
    find_checkpoint,
    missing_checkpoint_message,
    model_hash,
)
from .conditioning import COMMA_BACKTRACK, Conditioning, PromptEncoder, condition
from .config import ScheduleConfig
from .controlnet import ControlRun, ControlUnit, unit_infotext
from .decoder import decode_in_tiles
from .embeddings import Embeddings, load_embedding, ti_hashes
from .guidance import Guidance
from .hires import (
    SecondPass,
    check_hires,
    run_second_pass,
    second_pass_params,
    second_pass_start,
    second_pass_steps,
)
from .images import pil_to_tensor, tensor_to_uint8, to_rgb
from .inpaint import DEFAULT_FILL, DEFAULT_MASK_BLUR, DEFAULT_PADDING, InpaintSettings
from .inpaint_sampling import InpaintJob, is_inpainting_model
from .kernels import forget_folded_kernels
from .models import config_of, dtype_of
from .networks import (
    ActiveLora,
    LoraCache,
    RebindingMerger,
    UnmergedNetworks,
    WeightMerger,
    find_lora,
    lora_hashes,
    lora_tag,
)
from .params import GenerationParams
from .prompts import NetworkTag, extract_networks, lora_multipliers
from .samplers import Sampler, eps_from_v, get_sampler
from .samplers.schedule import abar_at, alphas_cumprod, train_sigmas
from .seamless import circular_padding
from .steps import Step, StepCallback
from .tokenizer import CLIPTokenizer
from .vae_swap import VAE_AUTOMATIC, VAE_NONE, VAEFileError, VAESwap, find_vae, read_vae, vae_hash, vae_name

log = logging.getLogger("sd")

# decode() tiles the VAE above this many latent pixels (128x128: a 1024x1024 SD1.5 image).
TILE_ABOVE_LATENTS = 128 * 128

MIN_SIZE, MAX_SIZE = 64, 2048


# A LoRA's strength: one for both models, or (text encoder, U-Net).
LoraWeight = float | tuple[float, float]
# The tag kinds A1111's built-in Lora extension answers to ("lyco": the old LyCORIS extension's).
LORA_TAG_KINDS = ("lora", "lyco")


def check_size(width: int | None, height: int | None, multiple: int = 8) -> None:
    """A clear error for a side the models cannot take; None (the model's own size) passes."""
    for name, value in (("width", width), ("height", height)):
        if value is None:
            continue
        if value % multiple or not MIN_SIZE <= value <= MAX_SIZE:
            raise ValueError(
                f"{name} must be a multiple of {multiple} between {MIN_SIZE} and {MAX_SIZE}, got {value}"
            )


def check_hires_settings(params: GenerationParams, downscale: int = 8) -> None:
    """A clear error for hires settings that cannot run (sd.hires.check_hires) or a final size out of range;
    unset sizes (None) stand for 512 in the first checks and skip the size one."""
    size = check_hires(replace(params, width=params.width or 512, height=params.height or 512), downscale)
    if params.width and params.height:
        try:
            check_size(size.width, size.height, downscale)
        except ValueError as error:
            raise ValueError(f"hires fix to {size.width}x{size.height}: {error}") from None


def check_settings(steps: int, cfg_scale: float, strength: float | None = None) -> None:
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not np.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"CFG scale must be a number >= 0, got {cfg_scale}")
    if strength is not None and not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")


def check_uncond_skips(params: GenerationParams) -> None:
    """A1111's skips of the negative pass: its way only, and not below 0."""
    if params.skip_early_cond < 0 or params.s_min_uncond < 0:
        raise ValueError("Skip Early CFG and NGMS must be >= 0 (0: off)")
    if not params.a1111 and (params.skip_early_cond or params.s_min_uncond):
        raise ValueError("Skip Early CFG and NGMS are A1111's settings: use A1111's way (a1111=True)")


def tiles_vae(latent_height: int, latent_width: int, vae_tiling: bool | None) -> bool:
    """Whether a decode of this many latent pixels works in tiles (`vae_tiling` None: above
    TILE_ABOVE_LATENTS)."""
    return latent_height * latent_width > TILE_ABOVE_LATENTS if vae_tiling is None else vae_tiling


def check_tiling(
    params: GenerationParams, vae_tiling: bool | None, compiled: bool = False, downscale: int = 8
) -> None:
    """Tiling (sd.seamless) needs convolutions that can be switched (not `compiled` ones), and a decode in
    one piece: tiles would not wrap."""
    if compiled:
        raise ValueError(
            "tiling needs the torch backend: the OpenVINO backend's models are compiled as they are"
        )
    params = replace(params, width=params.width or 512, height=params.height or 512)  # None: SD1.5's
    shape = (params.height // downscale, params.width // downscale)
    if params.enable_hr:
        shape = check_hires(params, downscale).latent_shape
    if tiles_vae(*shape, vae_tiling):
        raise ValueError(
            f"tiling decodes the image whole, and {shape[1] * downscale}x{shape[0] * downscale} would "
            "decode in tiles, which do not wrap: make it smaller, or turn VAE tiling off"
        )


def new_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def model_calls(params: GenerationParams, schedule: ScheduleConfig) -> int:
    """U-Net steps of one batch (for progress; nominal for DPM adaptive); ValueError for settings the
    sampler refuses (e.g. a strength that leaves no steps)."""
    if params.enable_hr:  # txt2img, then the second pass (its strength is the hires one)
        first = model_calls(replace(params, enable_hr=False, strength=None), schedule)
        second = second_pass_params(params)
        if not params.a1111:
            return first + model_calls(second, schedule)
        sampler = bind_a1111_sampler(second, schedule)
        return first + sampler.calls(second_pass_start(sampler, second_pass_steps(params)))
    if params.a1111:
        sampler = bind_a1111_sampler(params, schedule)
        return sampler.calls(sampler.img2img_start(params.strength) if params.strength else 0)
    return get_sampler(params.sampler, params.steps, schedule, params.karras).calls(params.strength)


class Pipeline:
    """SD1.x generation over the four components (`models` as returned by `sd.load_models`)."""

    def __init__(
        self,
        models: dict[str, nn.Module],
        tokenizer: CLIPTokenizer | None = None,
        device: torch.device | str = "cpu",
        idle_device: torch.device | str | None = None,
        schedule: ScheduleConfig | None = None,
        model_name: str | None = None,
        model_hash: str | None = None,
        embeddings: str | Path | Embeddings | None = None,
    ):
        """`embeddings`: a folder (or file) of textual-inversion embeddings, or an `Embeddings`."""
        self.models = models
        self.tokenizer = tokenizer or CLIPTokenizer()
        self.device = torch.device(device)
        self.idle_device = torch.device(idle_device) if idle_device is not None else None
        self.config = config_of(models)
        if schedule is not None:
            self.config = replace(self.config, schedule=schedule)
        self.model_name = model_name
        self.model_hash = model_hash
        self.vae_tiling: bool | None = None  # None: tile only large images (see tiles_vae)
        self.lora_dir: Path | None = None  # where <lora:name:w> tags are looked up
        self.vae_dir: Path | None = None  # where set_vae looks names up (A1111's models/VAE)
        self.vae_file: Path | None = None  # the swapped-in VAE; None: the checkpoint's own
        self.vae_hash: str | None = None  # A1111's VAE hash of vae_file
        self._vae_swap = VAESwap(models)
        self._lora_files = LoraCache()
        # Converted modules (OpenVINO) take their weights through rebind(); torch modules are merged into.
        converted = hasattr(models["diffusion"], "rebind")
        self._lora_merger = RebindingMerger(models) if converted else WeightMerger(models)
        self._loras: list[ActiveLora] = []  # set_loras' set; prompt tags add theirs per run
        self._control_units: list[ControlUnit] = []  # the ControlNets of the run under way (run())
        self.active_loras: list[ActiveLora] = []  # merged into the weights now
        self.comma_backtrack = COMMA_BACKTRACK  # A1111's comma_padding_backtrack (0: off)
        # where the embeddings were read from, so reload_embeddings can read it again (None: given as is)
        self.embeddings_source = None if isinstance(embeddings, Embeddings) else embeddings
        if not isinstance(embeddings, Embeddings):
            embeddings = self.load_embeddings(embeddings)
        self.embeddings = embeddings
        if self.device.type == "cpu":
            tune_malloc()
        for model in models.values():
            model.to(self.idle_device or self.device)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        idle_device: torch.device | str | None = None,
        embeddings: str | Path | None = None,
    ) -> Pipeline:
        """Load a checkpoint (found as `sd.checkpoints.find_checkpoint` says when `path` is None; with
        none anywhere, the built-in shapes model). Embeddings come from `embeddings`, else from the
        `embeddings` folder of the default model folder when there is one (A1111's layout)."""
        from .weights import load_models

        found = find_checkpoint(path)
        if found is None and BUILTIN_MODEL.exists():
            log.warning(builtin_notice())
            found = BUILTIN_MODEL
        if found is None:
            raise FileNotFoundError(missing_checkpoint_message())
        models = load_models(found, device="cpu", dtype=dtype)
        if dtype == torch.float16:
            # The SD VAE overflows fp16 (NaNs, black images): keep it in fp32. bf16 has fp32's range.
            for name in ("encoder", "decoder"):
                models[name].float()
        return cls(
            models,
            device=device,
            idle_device=idle_device,
            model_name=found.stem,
            model_hash=model_hash(found),
            embeddings=embeddings if embeddings is not None else default_embeddings_dir(),
        )

    def load_embeddings(self, source: str | Path | None) -> Embeddings:
        """Textual-inversion embeddings from a folder (searched recursively) or a file; none for None.
        Files that cannot be used are skipped with a one-line warning each (`Embeddings.skipped`)."""
        found = Embeddings(lambda text: self.tokenizer.encode(text, add_special_tokens=False),
                           self.config.clip.width)  # fmt: skip
        if source is not None:
            source = Path(source).expanduser()
            if source.is_dir():
                found.load_folder(source)
            elif source.exists():
                found.add(load_embedding(source))
            else:
                raise FileNotFoundError(f"embeddings not found: {source}")
        return found

    def reload_embeddings(self) -> None:
        """Read the embeddings folder (or file) again, so files added, changed or removed since count
        (A1111's refresh-embeddings); a folder that is gone leaves none."""
        source = self.embeddings_source
        if source is not None:
            self.embeddings = self.load_embeddings(source if Path(source).expanduser().exists() else None)

    # --- components -------------------------------------------------------------------------------

    def _use(self, name: str) -> nn.Module:
        return self.models[name].to(self.device)

    def _release(self, name: str) -> None:
        if self.idle_device is not None:
            self.models[name].to(self.idle_device)

    def prompt_encoder(self, clip_skip: int = 1, emphasis: str = "Original") -> PromptEncoder:
        """Prompts -> CLIP conditioning with this pipeline's text encoder, tokenizer and embeddings."""
        return PromptEncoder(lambda: self._use("clip"), self.tokenizer, self.embeddings, clip_skip, emphasis,
                             self.comma_backtrack, self.device)  # fmt: skip

    # --- LoRA ---------------------------------------------------------------------------------------

    def set_loras(self, loras: Sequence[tuple[str | Path, LoraWeight]], merge: bool = True) -> None:
        """Merge these LoRA / LyCORIS files into the weights, in order: each `(path, weight)`, the weight a
        float or a `(text_encoder, unet)` pair (A1111's strengths). `[]` restores the original weights bit
        for bit. Prompt tags (`<lora:name:w>`) add their files on top for a run. `merge=False` keeps them
        (and later tags) out of the weights: forward hooks add them to the layers' outputs instead.
        ValueError (one line) for a file that is no LoRA for this model."""
        self._lora_mode(merge)
        entries = []
        for path, weight in loras:
            te, unet = (weight, weight) if isinstance(weight, (int, float)) else weight
            file = self._lora_files.load(path, self.config)
            entries.append(ActiveLora(file.name, file, float(te), float(unet)))
        self._apply_loras(entries)
        self._loras = entries

    def _lora_mode(self, merge: bool) -> None:
        if merge == (not isinstance(self._lora_merger, UnmergedNetworks)):
            return
        if not merge and isinstance(self._lora_merger, RebindingMerger):
            raise ValueError("un-merged LoRA needs the torch backend's modules (OpenVINO merges them)")
        self._lora_merger.restore()
        self.active_loras = []
        self._lora_merger = WeightMerger(self.models) if merge else UnmergedNetworks(self.models)

    def _apply_loras(self, loras: list[ActiveLora]) -> None:
        try:
            self._lora_merger.apply(loras)  # the same set again costs nothing
        except BaseException:
            self.active_loras = []  # the merger put the original weights back
            raise
        self.active_loras = loras
        self._lora_files.keep_only(a.file for a in [*self._loras, *loras])  # memory: only files in use

    def _tag_loras(self, tags: list[NetworkTag]) -> list[ActiveLora]:
        """The files the prompt's <lora:...> tags name, found in `lora_dir`; other tags and unknown names
        are skipped with a warning, as A1111 skips them."""
        found = []
        for tag in tags:
            if tag.kind not in LORA_TAG_KINDS:
                log.warning("%s: %s networks are not supported yet; the tag is ignored", tag.text, tag.kind)
                continue
            te, unet = lora_multipliers(tag)
            path = find_lora(self.lora_dir, tag.name) if self.lora_dir is not None else None
            if path is None:
                where = f"in {self.lora_dir}" if self.lora_dir is not None else "(no LoRA folder: --lora-dir)"
                log.warning("%s: no LoRA named %r %s; the tag is ignored", tag.text, tag.name, where)
                continue
            try:
                file = self._lora_files.load(path, self.config)
            except ValueError as error:  # A1111 logs a file it cannot use and makes the image without it
                log.warning("%s: %s; the tag is ignored", tag.text, error)
                continue
            found.append(ActiveLora(tag.name, file, te, unet))
        return found

    # --- VAE swap ---------------------------------------------------------------------------------

    def set_vae(self, vae: str | Path | None) -> None:
        """Encode and decode with this VAE file (original or diffusers layout; a bare name is looked up in
        `vae_dir`); None, "None" or "Automatic" give the checkpoint's own back, bit for bit. VAEFileError
        (one line) for a file that is no SD1.x VAE."""
        path = None
        if vae is not None and str(vae) not in (VAE_AUTOMATIC, VAE_NONE):
            path = find_vae(self.vae_dir, str(vae))
            if path is None:
                where = f" in {self.vae_dir}" if self.vae_dir is not None else ""
                raise VAEFileError(f"{vae}: no such VAE file{where}")
            path = path.resolve()
        if path == self.vae_file:
            return
        states = read_vae(path, self.config) if path is not None else None
        digest = vae_hash(path) if path is not None else None
        self._vae_swap.apply(states, digest)
        self.vae_file, self.vae_hash = path, digest

    def condition(
        self, params: GenerationParams, total_steps: int, hires_steps: int | None = None
    ) -> Conditioning:
        """The run's conditioning over `total_steps` prompt-editing steps (`hires_steps`: of a hires pass
        after such a first pass): A1111 prompt syntax, any length, embeddings; each distinct text encoded
        once. <lora:...> tags are taken out of the prompt and their files merged (after `set_loras`' set)
        before the text encoder runs, as A1111 does."""
        prompt, tags = extract_networks(params.prompt)
        self._apply_loras([*self._loras, *self._tag_loras(tags)])
        encoder = self.prompt_encoder(params.clip_skip, params.emphasis)
        conditioning = condition(
            encoder, prompt, params.negative_prompt, total_steps, params.pad_conds,
            old_scheduling=params.old_prompt_editing, hires_steps=hires_steps,
        )  # fmt: skip
        self._release("clip")
        return conditioning

    @torch.no_grad()
    def encode_image(self, image: Image.Image, generator: torch.Generator | None) -> torch.Tensor:
        """Scaled latents of `image`, sampled from the VAE's distribution with `generator` (its mean for
        None)."""
        return self.encode_pixels(pil_to_tensor(image), generator)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """`encode_image` for (1, 3, H, W) pixels in [-1, 1]."""
        encoder = self._use("encoder")
        pixels = pixels.to(self.device, dtype_of(encoder))
        with large_buffers_from_kernel():  # the VAE's few huge activations would fragment the heap
            posterior = encoder.encode(pixels)
            latents = posterior.mean if generator is None else posterior.sample(generator)
            latents = latents * self.config.vae.scaling_factor
        self._release("encoder")
        return latents

    def tiles_vae(self, latents: torch.Tensor) -> bool:
        """Whether decode() works in tiles: as `vae_tiling` says, or in auto mode (None) above
        TILE_ABOVE_LATENTS latent pixels (beyond 1024x1024 for SD1.5)."""
        return tiles_vae(latents.shape[-2], latents.shape[-1], self.vae_tiling)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, truncate: bool = False) -> np.ndarray:
        """Latents -> (B, H, W, 3) uint8, one image at a time (a batch would multiply peak memory); pixels
        rounded (diffusers) or truncated (`truncate`, A1111)."""
        decoder = self._use("decoder")
        latents = latents.to(dtype_of(decoder))
        tiled = self.tiles_vae(latents)
        scale = self.config.vae.downscale
        forget_folded_kernels(self.models["diffusion"])  # the next image folds them again; here they'd add
        with large_buffers_from_kernel():  # the VAE's few huge activations would fragment the heap
            images = np.concatenate([
                tensor_to_uint8(
                    decode_in_tiles(decoder, one[None], scale) if tiled else decoder(one[None]), truncate
                )
                for one in latents
            ])  # fmt: skip
        self._release("decoder")
        return images

    # --- the loop ---------------------------------------------------------------------------------

    def denoise(
        self,
        latents: torch.Tensor,
        guidance: Guidance,
        sampler: Sampler,
        generator: torch.Generator,
        start: int = 0,
        job: InpaintJob | None = None,
    ) -> Iterator[Step]:
        """Run `sampler` from model call `start`, yielding a Step after each call (the last: the result)."""
        unet = self._use("diffusion")
        dtype = dtype_of(unet)
        control = None
        if self._control_units:  # sized to these latents (a hires pass, an "only masked" crop: theirs)
            down = self.config.vae.downscale
            calls = len(sampler.timesteps) - start  # diffusers counts the run's own timesteps
            control = ControlRun(self._control_units, calls, latents.shape[-1] * down,
                                 latents.shape[-2] * down, self.device)  # fmt: skip

        def model(x: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = job.unet_input(x) if job is not None else x
            residuals = control.residuals(x, context, t) if control is not None else None
            return unet(x_in.to(dtype), context.to(dtype), t, residuals).to(x.dtype)

        # Grad mode is switched off inside eps() only: a `with` around the yields would leak into the
        # caller's code between steps.
        @torch.no_grad()
        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if control is not None:
                control.next_call()
            return guidance(model, x, t)

        # Guiding v or eps is the same: at a given x_t one is an affine function of the other.
        schedule = self.config.schedule
        guided = predict
        if schedule.prediction_type == "v_prediction":
            guided = eps_from_v(predict, alphas_cumprod(schedule))
        log_sigmas = train_sigmas(alphas_cumprod(schedule).double()).log()
        denoised = [None]

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out = guided(x, t)  # every sampler calls it on a VP latent: x0 = (x - sqrt(1 - a) eps) / sqrt(a)
            a = abar_at(t, log_sigmas).to(device=x.device, dtype=x.dtype)
            denoised[0] = (x - (1 - a).sqrt() * out) / a.sqrt()
            return out

        total = len(sampler.timesteps)
        for index, x in sampler.sample(eps, latents, generator=generator, start=start):
            yield Step(index, total, float(sampler.timesteps[index]), x, denoised[0])
        self._release("diffusion")

    # --- user-facing ------------------------------------------------------------------------------

    def _run(
        self,
        params: GenerationParams,
        num_images: int,
        eta: float,
        callback: StepCallback | None,
        image: Image.Image | None = None,
        job: InpaintJob | None = None,
    ) -> list[Image.Image]:
        check_size(params.width, params.height, self.config.vae.downscale)
        check_settings(params.steps, params.cfg_scale, params.strength)
        check_uncond_skips(params)
        if num_images < 1:
            raise ValueError(f"number of images must be at least 1, got {num_images}")
        if params.enable_hr:
            if image is not None:
                raise ValueError("the hires fix is for txt2img; an init image makes this img2img")
            check_hires_settings(params, self.config.vae.downscale)
        if params.tiling:
            compiled = hasattr(self.models["diffusion"], "rebind")  # the OpenVINO backend's
            check_tiling(params, self.vae_tiling, compiled, self.config.vae.downscale)
        if image is not None and image.size != (params.width, params.height):
            image = image.resize((params.width, params.height), Image.Resampling.LANCZOS)
        with circular_padding(self.models.values(), params.tiling):  # A1111's Tiling: the whole run
            return self._make(params, num_images, eta, callback, image, job)

    def _make(self, params, num_images, eta, callback, image, job) -> list[Image.Image]:
        """_run after its checks: sample (both passes of the hires fix), decode, and the PNG parameters."""
        down = self.config.vae.downscale
        shape = (num_images, self.config.vae.latent_channels, params.height // down, params.width // down)
        job = job or self._unmasked_job()
        run = self._sample_a1111 if params.a1111 else self._sample_diffusers
        latents, conditioning, guidance, resolved = run(params, shape, eta, callback, image, job=job)
        if params.enable_hr:
            latents, second = run_second_pass(self, params, latents, eta, callback)
            resolved = {**resolved, **second}
        pixels = self.decode(latents, truncate=params.a1111)
        # set_loras' files are written as the prompt tags A1111 (and --from-png) would apply them from.
        tags = [lora_tag(a) for a in self._loras]
        prompt = " ".join([params.prompt, *tags])
        if params.hr_prompt:  # A1111 re-activates the networks from the hires prompt's tags
            params = replace(params, hr_prompt=" ".join([params.hr_prompt, *tags]))
        params = replace(params, prompt=prompt, ti_hashes=ti_hashes(conditioning.embeddings),
                         pad_conds=guidance.padded, lora_hashes=lora_hashes(self.active_loras), unhonoured=(),
                         **resolved)  # fmt: skip
        finish = job.finish if job is not None else (lambda im: im)
        return [
            finish(self._with_params(Image.fromarray(p), self._image_params(params, i, num_images)))
            for i, p in enumerate(pixels)
        ]

    def _unmasked_job(self) -> InpaintJob | None:
        """An inpainting model's job without a mask (txt2img, img2img, the hires pass, as A1111 uses it: a
        mask of ones); None for a regular model."""
        if is_inpainting_model(self.config.unet.in_channels):
            return InpaintJob(InpaintSettings(), None, nine=True)
        return None

    @staticmethod
    def _image_params(params: GenerationParams, index: int, count: int) -> GenerationParams:
        """The parameters image `index` of a batch of `count` is replayed from, alone."""
        if not params.a1111:  # diffusers' way: one generator for the batch, so the batch and a position
            return replace(params, batch_size=count, batch_pos=index)
        return params.a1111_image(index)  # A1111's way: each image its own seed (or subseed), as A1111 writes

    def _sample_diffusers(self, params, shape, eta, callback, image, init=None, job=None):
        """diffusers' way: its schedulers' grids, one CPU generator for the batch, its draw order. `init`:
        (clean latents, generator) to run img2img from instead of an image (the hires pass). `job`:
        inpainting (sd.inpaint_sampling)."""
        job = job or self._unmasked_job()
        sampler = get_sampler(params.sampler, params.steps, self.config.schedule, params.karras, eta)
        generator = torch.Generator("cpu").manual_seed(params.seed) if init is None else init[1]
        conditioning = self.condition(params, sampler.num_steps * sampler.order)
        guidance = Guidance(conditioning, params.cfg_scale)
        start = 0
        masked = job is not None and job.masked
        if image is None and init is None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            latents = noise.to(self.device) * sampler.init_noise_sigma
            if job is not None:
                job.condition(self, None, shape, generator, a1111=False)
        else:
            start = sampler.start_index(params.strength)
            # diffusers' inpainting at full strength starts from pure noise, and encodes the init image
            # (first) only when it is needed: a 4-channel model's blend, or a strength below 1.
            full = masked and params.strength >= 1.0
            clean = None
            if init is not None:
                clean = init[0].to(self.device).expand(shape[0], -1, -1, -1)
            elif not (full and job.nine):
                clean = (
                    self.encode_image(image, generator).float().to(self.device).expand(shape[0], -1, -1, -1)
                )
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
            if job is not None:
                job.condition(self, image, shape, generator, a1111=False)
                seed = params.seed
                clean = job.fill_latents(clean, lambda: torch.randn(
                    shape, generator=torch.Generator().manual_seed(seed)))  # fmt: skip
                job.clean, job.noise = clean, noise
            latents = noise * sampler.init_noise_sigma if full else sampler.add_noise(clean, noise, start)
        blend = masked and not job.nine
        step = None
        for step in self.denoise(latents, guidance, sampler, generator, start, job):
            if blend:
                job.blend_diffusers(step.latents, sampler, step.index)
            if callback is not None:
                callback(step)
        return step.latents, conditioning, guidance, {}

    def _sample_a1111(self, params, shape, eta, callback, image, init: SecondPass | None = None, job=None):
        return sample_a1111(self, params, shape, eta, callback, image, init, job)

    def _with_params(self, image: Image.Image, params: GenerationParams) -> Image.Image:
        # The text travels in image.info["parameters"]; save_png writes it into the PNG.
        vae = vae_name(self.vae_file) if self.vae_file is not None else None
        params = replace(params, model=self.model_name, model_hash=self.model_hash, vae=vae,
                         vae_hash=self.vae_hash)  # fmt: skip
        image.info["parameters"] = params.to_text()
        return image

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (SD1.5: 512), the default of txt2img."""
        return self.config.native_size

    def run(
        self,
        params: GenerationParams,
        image: Image.Image | None = None,
        num_images: int = 1,
        eta: float = 0.0,
        callback: StepCallback | None = None,
        mask: Image.Image | np.ndarray | torch.Tensor | str | Path | None = None,
        composite: bool = True,
        control: Sequence[ControlUnit] = (),
    ) -> list[Image.Image]:
        """Images for a whole `GenerationParams` (e.g. read back from a PNG); img2img when `image` is given,
        inpainting when `mask` is too (its controls: `params.inpaint`; see `inpaint`); steered by the
        ControlNets of `control` (sd.controlnet; diffusers' way).

        Unset sizes (None) become the model's own (txt2img) or the image's rounded down to a multiple of
        the VAE's downscale (img2img, as diffusers does)."""
        for unit in control:
            unit.check(params.a1111)
        if control and not params.controlnet:  # (the server passes its units' own)
            params = replace(params, controlnet=tuple(unit_infotext(unit) for unit in control))
        if control and hasattr(self.models["diffusion"], "rebind"):
            raise ValueError(
                "ControlNet needs the torch backend: the OpenVINO U-Net is compiled without its inputs"
            )
        self._control_units = list(control)
        try:
            return self._run_params(params, image, num_images, eta, callback, mask, composite)
        finally:
            self._control_units = []

    def _run_params(self, params, image, num_images, eta, callback, mask, composite) -> list[Image.Image]:
        if image is None and mask is not None:
            raise ValueError("a mask needs the image it belongs to")
        if image is None:
            width, height = params.width or self.native_size, params.height or self.native_size
        else:
            if params.strength is None:
                raise ValueError("img2img needs a strength in (0, 1]")
            image = to_rgb(image)
            down = self.config.vae.downscale
            width = params.width or image.width - image.width % down
            height = params.height or image.height - image.height % down
        if mask is not None:
            return self._inpaint(params, image, mask, num_images, eta, callback, composite)
        return self._run(replace(params, width=width, height=height), num_images, eta, callback, image)

    def _inpaint(self, params, image, mask, num_images, eta, callback, composite) -> list[Image.Image]:
        from .inpaint import load_mask, prepare

        settings = params.inpaint or InpaintSettings()
        down = self.config.vae.downscale
        if settings.inpaint_full_res:  # the crop is worked on at the model's size unless told
            width, height = params.width or self.native_size, params.height or self.native_size
        else:
            width = params.width or image.width - image.width % down
            height = params.height or image.height - image.height % down
        check_size(width, height, down)
        nine = is_inpainting_model(self.config.unet.in_channels)
        prepared = prepare(image, load_mask(mask), width, height, settings)
        job = InpaintJob(settings, prepared, nine=nine, composite=composite)
        params = replace(params, width=width, height=height, inpaint=settings, nine_channel=nine)
        return self._run(params, num_images, eta, callback, prepared.image, job)

    def txt2img(
        self,
        prompt: str,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int = 25,
        cfg_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        karras: bool = False,
        eta: float = 0.0,
        seed: int | None = None,
        num_images: int = 1,
        clip_skip: int = 1,
        callback: StepCallback | None = None,
        *,
        enable_hr: bool = False,
        hr_scale: float = 2.0,
        hr_upscaler: str | None = None,
        hr_second_pass_steps: int = 0,
        denoising_strength: float = 0.75,
        hr_resize_x: int = 0,
        hr_resize_y: int = 0,
        hr_sampler_name: str | None = None,
        hr_scheduler: str | None = None,
        hr_prompt: str = "",
        hr_negative_prompt: str = "",
        control: Sequence[ControlUnit] = (),
    ) -> list[Image.Image]:
        """Images for `prompt`, `native_size` square unless told; each PIL image carries its generation
        parameters in `image.info`.

        `enable_hr`: A1111's hires fix (sd.hires), with A1111's API names and defaults: upscale by
        `hr_scale` (or to `hr_resize_x` x `hr_resize_y`, one of them 0: that side from the aspect) with
        `hr_upscaler` (None: "Latent"; "Latent (bicubic)", ..., "Lanczos", "Nearest", "None"), then
        `hr_second_pass_steps` (0: `steps`) at `denoising_strength`, with `hr_sampler_name`,
        `hr_scheduler`, `hr_prompt`, `hr_negative_prompt` where given (else the first pass's).
        `control`: ControlNet units (sd.controlnet.ControlUnit) steering the image."""
        seed = new_seed() if seed is None else seed
        params = GenerationParams(prompt, negative_prompt, steps, sampler, karras, cfg_scale, seed,
                                  width, height, None, clip_skip)  # fmt: skip
        if enable_hr:
            params = replace(
                params, enable_hr=True, hr_scale=hr_scale, hr_upscaler=hr_upscaler,
                hr_second_pass_steps=hr_second_pass_steps, strength=denoising_strength,
                hr_resize_x=hr_resize_x, hr_resize_y=hr_resize_y, hr_sampler_name=hr_sampler_name,
                hr_scheduler=hr_scheduler, hr_prompt=hr_prompt, hr_negative_prompt=hr_negative_prompt,
            )  # fmt: skip
        return self.run(params, None, num_images, eta, callback, control=control)

    def img2img(
        self,
        image: Image.Image,
        prompt: str,
        negative_prompt: str = "",
        strength: float = 0.8,
        width: int | None = None,
        height: int | None = None,
        steps: int = 25,
        cfg_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        karras: bool = False,
        eta: float = 0.0,
        seed: int | None = None,
        num_images: int = 1,
        clip_skip: int = 1,
        callback: StepCallback | None = None,
        *,
        control: Sequence[ControlUnit] = (),
    ) -> list[Image.Image]:
        """Re-imagine `image`; `strength` 1.0 ignores it, small values keep it. Size defaults to the
        image's, rounded down to a multiple of 8 (as diffusers does). `control`: as txt2img's."""
        seed = new_seed() if seed is None else seed
        params = GenerationParams(prompt, negative_prompt, steps, sampler, karras, cfg_scale, seed,
                                  width, height, strength, clip_skip)  # fmt: skip
        return self.run(params, image, num_images, eta, callback, control=control)

    def inpaint(
        self,
        image: Image.Image,
        mask: Image.Image | np.ndarray | torch.Tensor | str | Path | None,
        prompt: str,
        negative_prompt: str = "",
        strength: float = 0.75,
        width: int | None = None,
        height: int | None = None,
        steps: int = 25,
        cfg_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        karras: bool = False,
        eta: float = 0.0,
        seed: int | None = None,
        num_images: int = 1,
        clip_skip: int = 1,
        callback: StepCallback | None = None,
        mask_blur: int | None = DEFAULT_MASK_BLUR,
        mask_blur_x: int | None = None,
        mask_blur_y: int | None = None,
        inpainting_fill: int | str = DEFAULT_FILL,
        inpaint_full_res: bool = False,
        inpaint_full_res_padding: int = DEFAULT_PADDING,
        inpainting_mask_invert: bool | int = False,
        inpainting_mask_weight: float = 1.0,
        composite: bool = True,
        a1111: bool = False,
        control: Sequence[ControlUnit] = (),
    ) -> list[Image.Image]:
        """Repaint the white part of `mask` (a file, PIL image or array; None: the image's transparent
        part). Keywords as `img2img`, plus A1111's mask controls under its API names (defaults: its UI's):
        `mask_blur` (or `mask_blur_x`/`_y`), `inpainting_fill` 0..3 or "fill" / "original" / "latent noise"
        / "latent nothing", `inpaint_full_res` ("only masked": the crop around the mask, padded by
        `inpaint_full_res_padding`, is worked on at width x height, default the model's size, and pasted
        back), `inpainting_mask_invert`, `inpainting_mask_weight` (9-channel models). Outside the mask the
        result keeps the input's pixels (`composite=False`: the decoded image as diffusers returns it).
        Any SD1.5 model: a 4-channel one blends the known latents each step, the inpainting model takes the
        mask as input. `a1111=True`: A1111's sampling (sampler names as A1111's). An empty mask is a plain
        img2img (with a warning), as A1111 does under "only masked"."""
        from .inpaint import fill_mode, mask_from_alpha

        if mask is None:
            mask = mask_from_alpha(image)
            if mask is None:
                raise ValueError("inpaint needs a mask (white = repaint), or an image with transparent areas")
        seed = new_seed() if seed is None else seed
        blur = 0 if mask_blur is None else mask_blur
        settings = InpaintSettings(
            mask_blur_x=blur if mask_blur_x is None else mask_blur_x,
            mask_blur_y=blur if mask_blur_y is None else mask_blur_y,
            inpainting_fill=fill_mode(inpainting_fill),
            inpaint_full_res=bool(inpaint_full_res),
            inpaint_full_res_padding=int(inpaint_full_res_padding),
            inpainting_mask_invert=bool(inpainting_mask_invert),
            mask_weight=inpainting_mask_weight,
        )
        params = GenerationParams(prompt, negative_prompt, steps, sampler, karras, cfg_scale, seed, width,
                                  height, strength, clip_skip, inpaint=settings, a1111=a1111)  # fmt: skip
        if a1111:  # our sampler names read as A1111's ("dpmpp_2m" is "DPM++ 2M"), as sd generate does
            from .params import a1111_sampler

            label, named = a1111_sampler(sampler)
            params = replace(params, sampler=label, karras=False,
                             schedule="Karras" if karras else (named or "Automatic"))  # fmt: skip
        return self.run(params, image, num_images, eta, callback, mask=mask, composite=composite,
                        control=control)  # fmt: skip

    def outpaint(
        self,
        image: Image.Image,
        prompt: str,
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        strength: float = 1.0,
        mask_blur: int = DEFAULT_MASK_BLUR,
        inpainting_fill: int | str = 0,
        **kwargs,
    ) -> list[Image.Image]:
        """Extend `image` by `left`/`right`/`top`/`bottom` pixels: the new area is painted (as A1111's
        outpainting script: "fill" content, the mask reaching twice `mask_blur` into the image so the seam
        blends there); the image itself is kept pixel for pixel. Other keywords as `inpaint`."""
        from .inpaint import fill_mode

        seed = kwargs.pop("seed", None)
        seed = new_seed() if seed is None else seed
        names = ("negative_prompt", "steps", "cfg_scale", "sampler", "karras", "clip_skip", "a1111")
        run_keys = ("eta", "num_images", "callback", "composite")
        unknown = set(kwargs) - {*names, *run_keys, "inpainting_mask_weight"}
        if unknown:
            raise TypeError(
                f"outpaint() got unexpected keywords {sorted(unknown)} (the size is the canvas's)"
            )
        settings = InpaintSettings(mask_blur, mask_blur, fill_mode(inpainting_fill),
                                   mask_weight=kwargs.get("inpainting_mask_weight", 1.0))  # fmt: skip
        defaults = GenerationParams(prompt, steps=25, sampler="dpmpp_2m", seed=seed, width=None, height=None)
        chosen = {k: kwargs[k] for k in names if k in kwargs}
        params = replace(defaults, strength=strength, inpaint=settings, **chosen)
        run = {k: kwargs[k] for k in run_keys if k in kwargs}
        return self.run_outpaint(params, image, (left, right, top, bottom), **run)

    def run_outpaint(
        self,
        params: GenerationParams,
        image: Image.Image,
        sides: tuple[int, int, int, int],
        num_images: int = 1,
        eta: float = 0.0,
        callback: StepCallback | None = None,
        composite: bool = True,
        control: Sequence[ControlUnit] = (),
    ) -> list[Image.Image]:
        """`outpaint` for a whole `GenerationParams` (its mask blur sets the seam); `sides` = (left, right,
        top, bottom) pixels. The canvas is worked on whole, at its own size (a ControlNet hint: resized to
        it)."""
        from .inpaint import outpaint_canvas

        left, right, top, bottom = sides
        settings = params.inpaint or InpaintSettings(inpainting_fill=0)
        overlap = 2 * max(settings.mask_blur_x, settings.mask_blur_y)
        down = self.config.vae.downscale
        canvas = outpaint_canvas(to_rgb(image), left, right, top, bottom, overlap=overlap, multiple=down)
        params = replace(params, width=None, height=None, inpaint=replace(settings, inpaint_full_res=False))
        images = self.run(
            params,
            canvas.canvas,
            num_images,
            eta,
            callback,
            mask=canvas.mask,
            composite=composite,
            control=control,
        )
        out = []
        for im in images:
            cropped = im.crop(canvas.box) if canvas.box != (0, 0, *im.size) else im
            cropped.info.update(im.info)
            out.append(cropped)
        return out


def generate(
    prompt: str,
    uncond_prompt: str | None = None,
    input_image: Image.Image | None = None,
    strength: float = 0.8,
    do_cfg: bool = True,
    cfg_scale: float = 7.5,
    sampler_name: str = "ddpm",
    n_inference_steps: int = 50,
    models: dict[str, nn.Module] | None = None,
    seed: int | None = None,
    device: torch.device | str | None = None,
    idle_device: torch.device | str | None = None,
    tokenizer: CLIPTokenizer | None = None,
    width: int = 512,
    height: int = 512,
) -> np.ndarray:
    """The seed's API: one H x W x 3 uint8 image. Models not in use wait on `idle_device`.

    `tokenizer` may be ours or transformers' CLIPTokenizer (`encode`, `get_vocab`, `bos_token_id`,
    `eos_token_id` are used). Prompts are read with A1111's syntax, of any length. `input_image` is
    resized to width x height, as the seed did.
    """
    if not models:
        raise ValueError(
            "generate() needs models={'clip', 'encoder', 'decoder', 'diffusion'} (sd.load_models)"
        )
    pipe = Pipeline(models, tokenizer=tokenizer, device=device or "cpu", idle_device=idle_device)
    guidance = cfg_scale if do_cfg else 1.0
    common = dict(
        prompt=prompt,
        negative_prompt=uncond_prompt or "",
        width=width,
        height=height,
        steps=n_inference_steps,
        cfg_scale=guidance,
        sampler=sampler_name,
        seed=seed,
    )
    if input_image is None:
        images = pipe.txt2img(**common)
    else:
        images = pipe.img2img(to_rgb(input_image), strength=strength, **common)
    return np.asarray(images[0])


__all__ = ["Pipeline", "Step", "generate"]
