"""Samplers vs the diffusers schedulers they reimplement, step by step, on a fake eps model.

The reference side is diffusers' own scheduler driven by the loop StableDiffusionPipeline /
StableDiffusionImg2ImgPipeline run (scale_model_input -> model -> step, begin index, add_noise), written here
independently of sd.samplers, so any drift in timesteps, sigmas, noise draws or update rules fails.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import Tensor

from sd.config import ScheduleConfig
from sd.ddpm import ddpm_sampler
from sd.samplers import ALIASES, KARRAS_SAMPLERS, SAMPLERS, Sampler, eps_from_v, get_sampler
from sd.samplers.schedule import alphas_cumprod

from conftest import REFERENCE_DIR

diffusers = pytest.importorskip("diffusers")

pytestmark = [  # numpy 2 deprecations inside diffusers' schedulers
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"),
]

# SD1.5's scheduler config (the model's PNDMScheduler; its DDIM variant lacks only skip_prk_steps)
SD15_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
CONFIGS = {
    "scheduler": {"_class_name": "PNDMScheduler", **SD15_SCHEDULER_CONFIG, "skip_prk_steps": True},
    "scheduler_ddim": {"_class_name": "DDIMScheduler", **SD15_SCHEDULER_CONFIG},
}
REFERENCE_CONFIGS = REFERENCE_DIR / "sd15-diffusers-configs.json"
SHAPE = (1, 4, 8, 8)
RTOL = 1e-5  # max |ours - diffusers| relative to max |diffusers|, per latent

# name -> (diffusers scheduler class, SD1.5 config key, extra options)
REFERENCE = {
    "ddpm": ("DDPMScheduler", "scheduler", {}),
    "ddim": ("DDIMScheduler", "scheduler_ddim", {}),
    "pndm": ("PNDMScheduler", "scheduler", {}),
    "lms": ("LMSDiscreteScheduler", "scheduler", {}),
    "euler": ("EulerDiscreteScheduler", "scheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", "scheduler", {}),
    "heun": ("HeunDiscreteScheduler", "scheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", "scheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", "scheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", "scheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", "scheduler", {}),
    "lcm": ("LCMScheduler", "scheduler", {}),
}


# abar_t of SD's training schedule, computed here independently of sd.samplers
_ABAR = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, dim=0)


def fake_eps(x: Tensor, t: Tensor) -> Tensor:
    """Deterministic stand-in for the U-Net, nonlinear in x and smooth in t (float or int timesteps).

    Mostly the exact eps-prediction for data ~ N(0, 0.5**2), so latents end at O(1) like real ones.
    """
    t = t.double().clamp(0, 999)
    low = t.floor().clamp(max=998).long()
    abar = torch.lerp(_ABAR[low], _ABAR[low + 1], t - low).float()
    s = t.float() / 1000
    gaussian = (1 - abar) ** 0.5 * x / (0.25 * abar + 1 - abar)
    return gaussian + 0.1 * torch.tanh(2 * x) * torch.cos(3 * s) + 0.05 * torch.sin(x + 7 * s)


def fake_v(x: Tensor, t: Tensor) -> Tensor:
    """A stand-in v-prediction model: nonlinear in x, smooth in t, O(1) like a real v."""
    return 0.9 * fake_eps(x, t) - 0.3 * torch.tanh(x + t.float() / 500)


def make_scheduler(name: str, karras: bool = False, prediction_type: str = "epsilon"):
    cls_name, key, extra = REFERENCE[name]
    options = dict(extra, prediction_type=prediction_type)
    if karras:
        options["use_karras_sigmas"] = True
    return getattr(diffusers, cls_name).from_config(CONFIGS[key], **options)


def step_kwargs(scheduler, generator: torch.Generator, eta: float) -> dict:
    """What StableDiffusionPipeline.prepare_extra_step_kwargs passes to scheduler.step."""
    params = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def diffusers_run(
    scheduler, x: Tensor, timesteps: Tensor, seed: int, eta: float = 0.0, model=fake_eps
) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    kwargs = step_kwargs(scheduler, generator, eta)
    latents = []
    for t in timesteps:
        output = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(output, t, x, **kwargs).prev_sample
        latents.append(x)
    return latents


def ours_run(sampler: Sampler, x: Tensor, seed: int, start: int = 0, model=fake_eps) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    steps = list(sampler.sample(model, x, generator=generator, start=start))
    assert [i for i, _ in steps] == list(range(start, len(sampler.timesteps)))
    return [x for _, x in steps]


def max_rel_diff(ours: list[Tensor], ref: list[Tensor]) -> float:
    assert len(ours) == len(ref)
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, ref, strict=True))


def step_sigmas(scheduler, num_steps: int) -> Tensor:
    """diffusers' sigmas per step boundary (2nd-order schedulers store them interleaved)."""
    sigmas = scheduler.sigmas
    if scheduler.order == 2:
        sigmas = sigmas[::2]
        if len(sigmas) == num_steps:  # Heun keeps one trailing 0, KDPM2 two
            sigmas = torch.cat([sigmas, scheduler.sigmas[-1:]])
    return sigmas


def assert_same_grid(sampler: Sampler, scheduler, num_steps: int) -> None:
    ref = scheduler.timesteps
    assert sampler.timesteps.shape == ref.shape
    assert sampler.timesteps.is_floating_point() == ref.is_floating_point()
    if ref.is_floating_point():
        torch.testing.assert_close(sampler.timesteps.double(), ref.double(), rtol=0, atol=1e-3)
    else:
        assert torch.equal(sampler.timesteps, ref)
    if sampler.sigmas is not None:
        torch.testing.assert_close(
            sampler.sigmas, step_sigmas(scheduler, num_steps).float(), rtol=1e-6, atol=0
        )
    assert sampler.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-6)
    assert sampler.order == scheduler.order


CASES = [
    pytest.param(name, karras, eta, id=f"{name}{'-karras' if karras else ''}{f'-eta{eta}' if eta else ''}")
    for name in SAMPLERS
    for karras in ([False, True] if name in KARRAS_SAMPLERS else [False])
    for eta in ([0.0, 0.7] if name == "ddim" else [0.0])
]


@pytest.mark.parametrize(("name", "karras", "eta"), CASES)
@pytest.mark.parametrize("num_steps", [4, 10, 25])
def test_txt2img_matches_diffusers(name: str, karras: bool, eta: float, num_steps: int) -> None:
    sampler = get_sampler(name, num_steps, karras=karras, eta=eta)
    scheduler = make_scheduler(name, karras)
    scheduler.set_timesteps(num_steps)
    assert_same_grid(sampler, scheduler, num_steps)

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = diffusers_run(scheduler, noise * scheduler.init_noise_sigma, scheduler.timesteps, seed=1, eta=eta)
    ours = ours_run(sampler, noise * sampler.init_noise_sigma, seed=1)
    assert torch.isfinite(ref[-1]).all()
    assert max_rel_diff(ours, ref) < RTOL


@pytest.mark.parametrize(("name", "karras", "eta"), CASES)
@pytest.mark.parametrize(("num_steps", "strength"), [(10, 0.3), (10, 0.75), (4, 0.75), (25, 0.75)])
def test_img2img_matches_diffusers(
    name: str, karras: bool, eta: float, num_steps: int, strength: float
) -> None:
    scheduler = make_scheduler(name, karras)
    scheduler.set_timesteps(num_steps)
    # StableDiffusionImg2ImgPipeline.get_timesteps / prepare_latents
    init_timestep = min(int(num_steps * strength), num_steps)
    t_start = max(num_steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).clamp(-2, 2)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    x_ref = scheduler.add_noise(x0, noise, timesteps[:1])
    ref = diffusers_run(scheduler, x_ref, timesteps, seed=4, eta=eta)

    sampler = get_sampler(name, num_steps, karras=karras, eta=eta)
    start = sampler.start_index(strength)
    assert start == t_start * scheduler.order
    torch.testing.assert_close(sampler.timesteps[start:].double(), timesteps.double(), rtol=0, atol=1e-3)
    x = sampler.add_noise(x0, noise, start)
    assert ((x - x_ref).abs().max() / x_ref.abs().max()).item() < RTOL
    assert max_rel_diff(ours_run(sampler, x, seed=4, start=start), ref) < RTOL


# diffusers' PNDM averages raw v outputs of different timesteps and converts the mix to eps at the current
# one; ours converts each output at its own timestep (PLMS is a multistep rule over eps), so they differ.
V_CASES = [case for case in CASES if case.values[0] != "pndm"]


@pytest.mark.parametrize(("name", "karras", "eta"), V_CASES)
def test_v_prediction_matches_diffusers(name: str, karras: bool, eta: float) -> None:
    """A v-predicting model behind eps_from_v (fractional timesteps included) = diffusers' v_prediction."""
    num_steps = 10
    scheduler = make_scheduler(name, karras, prediction_type="v_prediction")
    scheduler.set_timesteps(num_steps)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = noise * scheduler.init_noise_sigma
    ref = diffusers_run(scheduler, x, scheduler.timesteps, seed=1, eta=eta, model=fake_v)
    sampler = get_sampler(name, num_steps, karras=karras, eta=eta)
    ours = ours_run(sampler, x, seed=1, model=eps_from_v(fake_v, alphas_cumprod(ScheduleConfig())))
    assert torch.isfinite(ref[-1]).all()
    # Karras grids round the U-Net's timestep in some schedulers; diffusers converts v at the grid's exact
    # sigma, we at the timestep the U-Net is shown, a ~1e-4 difference.
    assert max_rel_diff(ours, ref) < (1e-3 if karras else RTOL)
    # and reading v as if it were eps is far off
    assert max_rel_diff(ours_run(sampler, x, seed=1, model=fake_v), ref) > 1e-2


def test_comparison_is_sensitive() -> None:
    """The parity check notices a tiny change: another seed, or a 1e-3 nudge of the model."""
    scheduler = make_scheduler("euler_a")
    scheduler.set_timesteps(10)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = diffusers_run(scheduler, noise * scheduler.init_noise_sigma, scheduler.timesteps, seed=1)
    sampler = get_sampler("euler_a", 10)
    x = noise * sampler.init_noise_sigma
    assert max_rel_diff(ours_run(sampler, x, seed=2), ref) > 1e-2
    nudged = [x for _, x in get_sampler("euler", 10).sample(lambda x, t: fake_eps(x, t) + 1e-3, x)]
    scheduler = make_scheduler("euler")
    scheduler.set_timesteps(10)
    assert max_rel_diff(nudged, diffusers_run(scheduler, x, scheduler.timesteps, seed=0)) > 10 * RTOL


@pytest.mark.skipif(not REFERENCE_CONFIGS.exists(), reason="reference configs not available")
def test_embedded_config_is_the_reference() -> None:
    reference = json.loads(REFERENCE_CONFIGS.read_text())
    for key, config in CONFIGS.items():
        assert reference[key] == config


def test_registry() -> None:
    assert set(SAMPLERS) == set(REFERENCE)
    assert all(isinstance(d, str) and d for d in SAMPLERS.values())
    assert ALIASES == {"plms": "pndm"}
    assert get_sampler("plms", 10).name == "pndm"
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("nope", 10)
    with pytest.raises(ValueError, match="Karras"):
        get_sampler("ddim", 10, karras=True)
    with pytest.raises(ValueError, match="eta"):
        get_sampler("euler", 10, eta=0.5)
    with pytest.raises(ValueError, match="no steps"):
        get_sampler("euler", 10).start_index(0.05)
    with pytest.raises(ValueError, match="start"):
        get_sampler("heun", 10).add_noise(torch.zeros(SHAPE), torch.zeros(SHAPE), 3)


def test_seed_ddpm_module_is_off_by_one_no_more() -> None:
    """The seed's DDPM ran 980..0 for 50 steps; diffusers (steps_offset=1, leading) runs 981..1."""
    timesteps = ddpm_sampler(50).timesteps
    assert timesteps[0].item() == 981
    assert timesteps[-1].item() == 1
    assert ddpm_sampler(50, ScheduleConfig()).timesteps.tolist() == timesteps.tolist()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_a", "dpmpp_2m_sde", "lcm"])
def test_stochastic_samplers_use_only_the_given_generator(name: str) -> None:
    sampler = get_sampler(name, 4, eta=1.0 if name == "ddim" else 0.0)
    assert sampler.stochastic
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Generator"):
        next(sampler.sample(fake_eps, x))
    state = torch.random.get_rng_state()
    runs = [ours_run(sampler, x, seed) for seed in (5, 5, 6)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(runs[0][-1], runs[1][-1])
    assert not torch.equal(runs[0][-1], runs[2][-1])


def test_deterministic_samplers_need_no_generator() -> None:
    for name in SAMPLERS:
        sampler = get_sampler(name, 4, eta=0.0)
        if not sampler.stochastic:
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sampler.init_noise_sigma
            *_, (i, out) = sampler.sample(fake_eps, x)
            assert i == len(sampler.timesteps) - 1
            assert torch.isfinite(out).all()


def test_calls_counts_the_model_calls_a_run_makes():
    heun = get_sampler("heun", 10)  # second order: two calls per step but the last
    assert heun.calls() == len(heun.timesteps) == 19
    assert heun.calls(0.5) == 19 - heun.start_index(0.5) == 9
    assert get_sampler("dpmpp_2m", 20).calls(0.3) == 6
    with pytest.raises(ValueError, match="no steps"):
        get_sampler("euler", 10).calls(0.05)
