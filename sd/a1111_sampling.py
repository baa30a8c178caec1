"""A1111's way of sampling (v1.10.1): its sampler set over k-diffusion's CompVisDenoiser
(sd_samplers_kdiffusion) and its own DDIM, PLMS and UniPC on the U-Net's eps (sd_samplers_timesteps),
both behind CFGDenoiser's guidance, with one noise stream per image (sd.noise). txt2img, img2img, the
hires fix's second pass (sd.hires) and inpainting (sd.inpaint_sampling: its blends) all start here; the
pipeline decodes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .controlnet import A1111ControlRun
from .guidance import Guidance, UncondSkip
from .hires import SecondPass, second_pass_start
from .models import dtype_of
from .noise import ImageNoise
from .samplers.a1111 import bind
from .samplers.lcm import lcm_denoised
from .samplers.sigmas import ldm_alphas_cumprod
from .samplers.timesteps import CFGPP_SCALE, TimestepsSampler
from .steps import Step

if TYPE_CHECKING:
    from .config import ScheduleConfig
    from .params import GenerationParams
    from .pipeline import Pipeline


def bind_a1111_sampler(params: GenerationParams, schedule: ScheduleConfig):
    """The A1111 sampler a run's parameters ask for (sd.samplers.a1111.bind)."""
    return bind(
        params.sampler, params.steps, ldm_alphas_cumprod(schedule, downcast=params.downcast_alphas),
        params.schedule, eta=params.eta, eta_ddim=params.eta_ddim, s_churn=params.s_churn,
        s_tmin=params.s_tmin, s_tmax=params.s_tmax, s_noise=params.s_noise, sigma_min=params.sigma_min,
        sigma_max=params.sigma_max, rho=params.rho, discard_penultimate=params.discard_penultimate,
    )  # fmt: skip


def sample_a1111(
    pipe: Pipeline, params, shape, eta, callback, image, init: SecondPass | None = None, job=None
):  # fmt: skip
    """A1111's way: its sampler set over the k-diffusion denoiser, one noise stream per image. `init`:
    the hires pass's start (sd.hires), img2img from its latents for exactly its steps. `job`:
    inpainting (sd.inpaint_sampling)."""
    job = job or pipe._unmasked_job()
    sampler = bind_a1111_sampler(params, pipe.config.schedule)
    if init is None:
        conditioning = pipe.condition(params, sampler.total_steps)
    else:  # A1111's hires conds: prompt-editing steps counted on from the first pass's
        conditioning = pipe.condition(params, init.first_total, hires_steps=init.hires_total)
    cfg_scale = params.cfg_scale
    if isinstance(sampler, TimestepsSampler) and sampler.spec.cfgpp:
        cfg_scale *= CFGPP_SCALE  # DDIM CFG++ guides at a fraction of the scale (the PNG keeps the scale)
    cfgpp = isinstance(sampler, TimestepsSampler) and sampler.spec.cfgpp
    guidance = Guidance(conditioning, cfg_scale, a1111=True, needs_uncond=cfgpp)
    images = [params.a1111_image(i) for i in range(shape[0])]
    seeds, subseeds = [p.seed for p in images], [p.subseed or 0 for p in images]
    noise = ImageNoise(shape[1:], seeds, params.rng, subseeds, params.subseed_strength,
                       params.seed_resize_from, params.ensd)  # fmt: skip
    x = noise.next().to(pipe.device)
    masked = job is not None and job.masked
    if job is not None:  # the latent mask and 9-channel input; txt2img and the hires pass: a mask of ones
        job.condition(pipe, image, shape, None, a1111=True)

    def fill_noise() -> torch.Tensor:  # A1111's "latent noise": the images' seeds' first noise, on its own
        return ImageNoise(shape[1:], seeds, params.rng).next()

    if isinstance(sampler, TimestepsSampler):
        return _sample_timesteps(pipe, sampler, params, x, noise, guidance, conditioning, callback, image,
                                 init, job, fill_noise)  # fmt: skip
    start = 0
    if init is not None:
        start = second_pass_start(sampler, init.steps)
        x = init.latents.to(pipe.device) + x * sampler.sigmas[start]
    elif image is None:
        x = x * ((1 + sampler.sigmas[0] ** 2) ** 0.5 if params.sgm_noise else sampler.sigmas[0])
    else:
        # A1111 samples the VAE posterior from an RNG the seed does not control: the mean is the
        # reproducible part of it.
        start = sampler.img2img_start(params.strength)
        clean = pipe.encode_image(image, None).float().expand(shape[0], -1, -1, -1)
        if job is not None:
            clean = job.fill_latents(clean, fill_noise)
            job.clean = clean
        x = clean + x * params.noise_multiplier * sampler.sigmas[start]

    guidance.skip = uncond_skip(params, sampler.denoiser_steps(start))
    control = _control_run(pipe, sampler, x, sampler.sampling_steps(start))
    unet = pipe._use("diffusion")
    dtype = dtype_of(unet)
    v_prediction = pipe.config.schedule.prediction_type == "v_prediction"
    timestep = [0.0]  # of the latest model call, for the progress callback

    lcm = sampler.spec.denoiser == "lcm"

    def denoised(x_in: torch.Tensor, context: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """k-diffusion's CompVisDenoiser (CompVisVDenoiser for v-prediction) over our U-Net; for LCM,
        A1111's LCM denoiser (its own timesteps, the boundary condition; eps even for v models)."""
        c_in = 1 / (sigma**2 + 1) ** 0.5
        t = sampler.table.sigma_to_t(sigma)
        timestep[0] = float(t)
        scaled = x_in * c_in
        ts = t.expand(x_in.shape[0])
        residuals = control.residuals(scaled, context, ts, guidance.cond_rows) if control else None
        if job is not None:
            scaled = job.unet_input(scaled)
        out = unet(scaled.to(dtype), context.to(dtype), ts, residuals).to(x_in.dtype)
        if lcm:
            return lcm_denoised(x_in, x_in + out * -sigma, t)
        if v_prediction:
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + x_in * (1 / (sigma**2 + 1))
        return x_in + out * -sigma

    last = [None]  # the latest call's clean-image prediction

    @torch.no_grad()
    def model(x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if control is not None:
            control.next_call()
        out = guidance(denoised, x_in, sigma)
        last[0] = out = job.blend(out) if masked else out
        return out

    total = sampler.calls(start)
    latents = x
    img2img = image is not None or init is not None
    for index, latents in enumerate(sampler.sample(model, x, noise, start, img2img=img2img)):
        if callback is not None:
            callback(Step(index, total, timestep[0], latents, last[0]))
    pipe._release("diffusion")
    if masked:  # and once more after sampling (StableDiffusionProcessingImg2Img.sample)
        latents = job.blend(latents)
    # As A1111 writes them: its own label for the sampler, the schedule type it resolved to.
    resolved = {"sampler": sampler.label, "schedule": sampler.schedule_label}
    return latents, conditioning, guidance, {**resolved, **skips_taken(params, guidance)}


def _control_run(pipe: Pipeline, sampler, x: torch.Tensor, steps: int) -> A1111ControlRun | None:
    """The run's ControlNets (Pipeline.run's `control`) at these latents' size, A1111's extension's way."""
    units = pipe._control_units
    if not units:
        return None
    if sampler.step_of_call(0) is None and any(u.start > 0 or u.end < 1 for u in units):
        raise ValueError(
            f"ControlNet guidance start/end with {sampler.label} is not supported yet; use 0 and 1"
        )
    down = pipe.config.vae.downscale
    return A1111ControlRun(
        units, steps, sampler.step_of_call, x.shape[-1] * down, x.shape[-2] * down, pipe.device
    )


def uncond_skip(params: GenerationParams, total_steps: int) -> UncondSkip | None:
    """A1111's skips of the negative pass the parameters ask for ("Skip Early CFG", NGMS), if any."""
    if not (params.skip_early_cond or params.s_min_uncond):
        return None
    return UncondSkip(total_steps, params.skip_early_cond, params.s_min_uncond, params.s_min_uncond_all)


def skips_taken(params: GenerationParams, guidance: Guidance) -> dict:
    """The skip settings as A1111 writes them: each only where it skipped a call."""
    ngms = "ngms" in guidance.skipped
    return {
        "skip_early_cond": params.skip_early_cond if "early" in guidance.skipped else 0.0,
        "s_min_uncond": params.s_min_uncond if ngms else 0.0,
        "s_min_uncond_all": params.s_min_uncond_all and ngms,
    }


def _sample_timesteps(
    pipe: Pipeline, sampler, params, x, noise, guidance, conditioning, callback, image, init, job, fill_noise
):  # fmt: skip
    """A1111's own DDIM, PLMS and UniPC: CFG on the U-Net's eps at (integer or continuous) timesteps."""
    masked = job is not None and job.masked
    start = 0
    if init is not None:
        start = second_pass_start(sampler, init.steps)
        x = sampler.img2img_latent(init.latents.to(pipe.device), x, start)
    elif image is None:
        x = sampler.txt2img_latent(x)
    else:
        start = sampler.img2img_start(params.strength)
        clean = pipe.encode_image(image, None).float().expand(x.shape[0], -1, -1, -1)
        if masked:  # as in sample_a1111: the fills, then the latents the blends keep
            clean = job.fill_latents(clean, fill_noise)
            job.clean = clean
        x = sampler.img2img_latent(clean, x * params.noise_multiplier, start)
    img2img = image is not None or init is not None
    guidance.skip = uncond_skip(params, sampler.denoiser_steps(start, img2img=img2img))
    control = _control_run(pipe, sampler, x, sampler.sampling_steps(start, img2img=img2img))
    unet = pipe._use("diffusion")
    dtype = dtype_of(unet)
    v_prediction = pipe.config.schedule.prediction_type == "v_prediction"
    alphas = sampler.alphas_cumprod
    timestep = [0.0]

    def eps(x_in: torch.Tensor, context: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        timestep[0] = float(t)
        ts = t.expand(x_in.shape[0])
        residuals = control.residuals(x_in, context, ts, guidance.cond_rows) if control else None
        x_unet = job.unet_input(x_in) if job is not None else x_in
        out = unet(x_unet.to(dtype), context.to(dtype), ts, residuals).to(x_in.dtype)
        if v_prediction:  # A1111's CompVisTimestepsVDenoiser, at the truncated timestep
            a = alphas[t.long()].to(x_in)
            return a.sqrt() * out + (1 - a).sqrt() * x_in
        return out

    last = [None]  # the latest call's clean-image prediction (A1111's get_pred_x0)

    @torch.no_grad()
    def model(x_in: torch.Tensor, t: torch.Tensor):
        if control is not None:
            control.next_call()
        if masked:  # A1111 v1.10.1's timestep samplers blend the U-Net's input, not its output
            x_in = job.blend(x_in)
        guided = guidance(eps, x_in, t)
        a = alphas[t.long()].to(x_in).reshape(-1, 1, 1, 1)
        last[0] = (x_in - (1 - a).sqrt() * guided) / a.sqrt()
        return (guided, guidance.uncond_output) if sampler.spec.cfgpp else guided

    total = sampler.calls(start)
    latents = x
    for index, latents in enumerate(sampler.sample(model, x, noise, start)):
        if callback is not None:
            callback(Step(index, total, timestep[0], latents, last[0]))
    pipe._release("diffusion")
    if masked:  # and once more after sampling, as for the k-diffusion samplers
        latents = job.blend(latents)
    eta = sampler.eta if sampler.spec.takes_eta and sampler.eta else None
    resolved = {"sampler": sampler.label, "eta": None, "eta_ddim": eta}
    return latents, conditioning, guidance, {**resolved, **skips_taken(params, guidance)}


__all__ = ["bind_a1111_sampler", "sample_a1111", "skips_taken", "uncond_skip"]
