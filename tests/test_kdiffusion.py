"""sd.samplers.kdiffusion and sd.samplers.sigmas against k-diffusion 0.1.1.post1, wired as A1111 wires it.

k-diffusion's own `sampling.py` (installed from PyPI with --no-deps; a1111-semantics.md §h) runs with the
same denoiser, the same sigmas, the same per-image noise streams in place of `torch.randn_like`, and Brownian
trees seeded per image with torchsde's draws taken from the RNG source. Same operations in the same order:
the results must be identical (max |difference| 0; the test allows 1e-6 of the scale for the platform).
Schedules are checked against k-diffusion's functions and the values a1111-semantics.md §d2 prints.

DPM fast and DPM adaptive run through `A1111Sampler` against k-diffusion's sample_dpm_fast/_adaptive, given
the sigma range A1111's sample/sample_img2img pass (worked out here from k-diffusion's CompVisDenoiser).
Restart and LCM are A1111's own code, not k-diffusion's (0.1.1 has no sample_lcm): their references are
transcriptions of sd_samplers_extra.restart_sampler and of sd_samplers_lcm.py (sample_lcm,
LCMCompVisDenoiser) over k-diffusion's primitives. Same tolerance throughout: 1e-6 of the scale.
"""

from __future__ import annotations

import itertools
import math
import types

import pytest
import torch

from sd.config import SD15
from sd.noise import BrownianNoise, ImageNoise, _torchsde_draws_from
from sd.samplers import kdiffusion as ours
from sd.samplers.a1111 import SAMPLERS, A1111Sampler, sampler_label
from sd.samplers.lcm import LCMSigmas, boundary_scalings, lcm_denoised
from sd.samplers.sigmas import SCHEDULE_TYPES, ModelSigmas, get_sigmas, ldm_alphas_cumprod, schedule_type

import kdiffusion_reference

SEEDS = [7, 8]
SHAPE = (4, 6, 5)


@pytest.fixture(scope="module")
def k():
    return kdiffusion_reference.load()[0]


def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear stand-in for D(x; sigma); sigma as k-diffusion passes it, (B,), or as ours, 0-d."""
    s = sigma.reshape(-1, 1, 1, 1) if sigma.ndim else sigma
    return x / (s**2 + 1) ** 0.5 * 0.9 + 0.2 * torch.sin(x * 1.3 + s) - 0.05 * s.log()


MODEL_SIGMAS = ModelSigmas(ldm_alphas_cumprod(SD15.schedule))

CASES = {
    # name: (ours, theirs, schedule, extra kwargs, needs brownian)
    "Euler": (ours.euler, "sample_euler", "uniform", {}, False),
    "Euler churn": (
        ours.euler,
        "sample_euler",
        "karras",
        {"s_churn": 0.8, "s_tmin": 0.1, "s_noise": 1.01},
        False,
    ),
    "Euler a": (ours.euler_ancestral, "sample_euler_ancestral", "uniform", {}, False),
    "Euler a eta": (ours.euler_ancestral, "sample_euler_ancestral", "uniform", {"eta": 0.6}, False),
    "LMS": (ours.lms, "sample_lms", "uniform", {}, False),
    "Heun": (ours.heun, "sample_heun", "uniform", {}, False),
    "Heun churn": (ours.heun, "sample_heun", "karras", {"s_churn": 1.0}, False),
    "DPM2": (ours.dpm_2, "sample_dpm_2", "karras", {}, False),
    "DPM2 a": (ours.dpm_2_ancestral, "sample_dpm_2_ancestral", "karras", {}, False),
    "DPM++ 2S a": (ours.dpmpp_2s_ancestral, "sample_dpmpp_2s_ancestral", "karras", {}, False),
    "DPM++ 2M": (ours.dpmpp_2m, "sample_dpmpp_2m", "karras", {}, False),
    "DPM++ SDE": (ours.dpmpp_sde, "sample_dpmpp_sde", "karras", {}, True),
    "DPM++ SDE eta": (ours.dpmpp_sde, "sample_dpmpp_sde", "karras", {"eta": 0.5, "s_noise": 0.9}, True),
    "DPM++ 2M SDE": (ours.dpmpp_2m_sde, "sample_dpmpp_2m_sde", "exponential", {}, True),
    "DPM++ 2M SDE Heun": (
        ours.dpmpp_2m_sde,
        "sample_dpmpp_2m_sde",
        "exponential",
        {"solver_type": "heun"},
        True,
    ),
    "DPM++ 3M SDE": (ours.dpmpp_3m_sde, "sample_dpmpp_3m_sde", "exponential", {}, True),
}


def run_ours(function, sigmas, kwargs, brownian, source):
    noise = ImageNoise(SHAPE, SEEDS, source)
    x = noise.next() * sigmas[0]
    extra = {}
    if brownian:
        extra["brownian"] = BrownianNoise(x, sigmas[sigmas > 0].min(), sigmas.max(), SEEDS, source)
    else:
        extra["noise"] = lambda: noise.next()
    calls = []

    def counted(x, sigma):
        calls.append(float(sigma))
        return model(x, sigma)

    outputs = list(function(counted, x, sigmas, **extra, **kwargs))
    assert len(outputs) == len(calls)  # one yield per model call
    return outputs[-1], len(calls)


def run_theirs(k, name, sigmas, kwargs, brownian, source, monkeypatch):
    noise = ImageNoise(SHAPE, SEEDS, source)
    monkeypatch.setattr(k, "torch", kdiffusion_reference.RandnFromStreams(noise))
    x = noise.next() * sigmas[0]
    extra = {}
    if brownian:
        with _torchsde_draws_from(source):
            extra["noise_sampler"] = k.BrownianTreeNoiseSampler(
                x, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS
            )
    calls = []

    def counted(x, sigma):
        calls.append(float(sigma[0]))
        return model(x, sigma)

    with _torchsde_draws_from(source):
        result = getattr(k, name)(counted, x, sigmas, disable=True, **extra, **kwargs)
    return result, len(calls)


@pytest.mark.parametrize("source", ["GPU", "CPU"])
@pytest.mark.parametrize("steps", [1, 2, 7])
@pytest.mark.parametrize("case", list(CASES))
def test_sampler_equals_k_diffusion(k, case, steps, source, monkeypatch) -> None:
    function, name, schedule, kwargs, brownian = CASES[case]
    discard = case.startswith(("DPM2", "DPM++ 3M"))
    sigmas = get_sigmas(schedule, steps, MODEL_SIGMAS, discard_penultimate=discard)
    mine, my_calls = run_ours(function, sigmas, kwargs, brownian, source)
    if steps == 1 and name in ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"):
        # k-diffusion fails there (UnboundLocalError: its `h` is set only by a step to sigma > 0); one step
        # to sigma 0 is the denoised initial noise, which is what ours gives.
        x = ImageNoise(SHAPE, SEEDS, source).next() * sigmas[0]
        assert torch.equal(mine, model(x, sigmas[0]))
        return
    theirs, their_calls = run_theirs(k, name, sigmas, kwargs, brownian, source, monkeypatch)
    assert my_calls == their_calls
    scale = theirs.abs().max()
    assert (mine - theirs).abs().max() <= 1e-6 * scale, f"{case}, {steps} steps, {source}"


def test_brownian_noise_depends_on_seed_and_source() -> None:
    x = torch.zeros(2, *SHAPE)
    sigma_min, sigma_max = torch.tensor(0.03), torch.tensor(14.6)
    a = BrownianNoise(x, sigma_min, sigma_max, [1, 2])(torch.tensor(5.0), torch.tensor(4.0))
    b = BrownianNoise(x[:1], sigma_min, sigma_max, [2])(torch.tensor(5.0), torch.tensor(4.0))
    assert torch.equal(a[1], b[0])  # per image: batch-independent
    c = BrownianNoise(x, sigma_min, sigma_max, [1, 2], "CPU")(torch.tensor(5.0), torch.tensor(4.0))
    assert not torch.equal(a, c)
    assert 0.5 < float(a.std()) < 1.5  # unit variance by construction


def test_schedules_equal_k_diffusion_and_a1111s_values(k) -> None:
    m = MODEL_SIGMAS
    # (spec §d2, run) the model's range and three schedules at 20 steps
    assert m.sigma_min == pytest.approx(0.029167535, abs=1e-8) and m.sigma_max == pytest.approx(
        14.614642, abs=1e-5
    )
    uniform = get_sigmas("uniform", 20, m)
    torch.testing.assert_close(
        uniform[:5], torch.tensor([14.614643, 10.746800, 8.081519, 6.204935, 4.855653])
    )
    torch.testing.assert_close(uniform[-4:], torch.tensor([0.355545, 0.232164, 0.029168, 0.0]))
    karras = get_sigmas("karras", 20, m)
    torch.testing.assert_close(
        karras[:6], torch.tensor([14.614643, 11.725368, 9.340208, 7.383627, 5.789421, 4.499844])
    )
    torch.testing.assert_close(karras[-4:], torch.tensor([0.077861, 0.048482, 0.029168, 0.0]))
    exponential = get_sigmas("exponential", 20, m)
    torch.testing.assert_close(exponential[:3], torch.tensor([14.614643, 10.536318, 7.596079]))
    dpm2 = get_sigmas("karras", 20, m, discard_penultimate=True)
    assert len(dpm2) == 21
    torch.testing.assert_close(dpm2[-3:], torch.tensor([0.074364, 0.047306, 0.0]))
    torch.testing.assert_close(m.sigma_to_t(uniform[:3]), torch.tensor([999.0, 946.421, 893.842]))
    # bit for bit k-diffusion's functions
    assert torch.equal(karras, k.get_sigmas_karras(20, m.sigma_min, m.sigma_max))
    assert torch.equal(exponential, k.get_sigmas_exponential(20, m.sigma_min, m.sigma_max))
    assert torch.equal(
        get_sigmas("polyexponential", 9, m), k.get_sigmas_polyexponential(9, m.sigma_min, m.sigma_max)
    )
    assert torch.equal(
        get_sigmas("karras", 9, m, rho=3.0), k.get_sigmas_karras(9, m.sigma_min, m.sigma_max, rho=3.0)
    )
    # (spec) old fp16 alphas: a different range
    old = ModelSigmas(ldm_alphas_cumprod(SD15.schedule, downcast=True))
    assert (old.sigma_min, old.sigma_max) == (0.03125, 14.609375)


def test_every_schedule_type_is_a_descending_ramp() -> None:
    for kind in SCHEDULE_TYPES:
        sigmas = get_sigmas(kind, 10, MODEL_SIGMAS)
        assert len(sigmas) == 11 and sigmas.dtype == torch.float32, kind
        assert bool((sigmas[:-1] > sigmas[1:]).all()), kind
        top = MODEL_SIGMAS.sigmas[901] if kind == "ddim" else MODEL_SIGMAS.sigma_max  # DDIM's 1 + 100 k grid
        assert abs(float(sigmas[0]) - top) < 0.02 * top, kind
    assert float(get_sigmas("kl_optimal", 10, MODEL_SIGMAS)[-1]) == pytest.approx(MODEL_SIGMAS.sigma_min)
    # NVIDIA's 11 levels as they are at 11 steps (A1111's n), interpolated in log sigma otherwise
    assert get_sigmas("align_your_steps", 11, MODEL_SIGMAS)[:3].tolist() == pytest.approx(
        [14.615, 6.475, 3.861]
    )
    assert schedule_type("SGM Uniform") == schedule_type("sgmuniform") == "sgm_uniform"
    assert schedule_type("Align Your Steps") == "align_your_steps"
    with pytest.raises(ValueError, match="unknown schedule type 'Fancy'"):
        schedule_type("Fancy")


# --- DPM fast, DPM adaptive, Restart and LCM, run through A1111Sampler as the pipeline runs them ---

TOLERANCE = 1e-6  # of the reference's scale


def assert_close_to(mine: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    difference, scale = float((mine - theirs).abs().max()), float(theirs.abs().max())
    print(f"{what}: max |difference| {difference:.3g} (scale {scale:.3g})")
    assert difference <= TOLERANCE * scale, f"{what}: max |difference| {difference:.3g} (scale {scale:.3g})"


def a1111_start(steps: int, strength: float | None) -> int:
    """Index of the first sigma of an img2img run (setup_img2img_steps, sigmas[steps - t_enc - 1:])."""
    return 0 if strength is None else steps - int(min(strength, 0.999) * steps) - 1


def initial_x(noise: ImageNoise, sigma0: torch.Tensor, img2img: bool) -> torch.Tensor:
    clean = torch.linspace(-1, 1, len(SEEDS) * math.prod(SHAPE)).reshape(len(SEEDS), *SHAPE)
    first = noise.next()
    return clean + first * sigma0 if img2img else first * sigma0


def run_a1111_sampler(sampler: A1111Sampler, source: str, strength: float | None, denoiser=model):
    noise = ImageNoise(SHAPE, SEEDS, source)
    start = a1111_start(sampler.steps, strength)
    x = initial_x(noise, sampler.sigmas[start], strength is not None)
    calls = []

    def counted(x, sigma):
        calls.append(float(sigma))
        return denoiser(x, sigma)

    outputs = list(sampler.sample(counted, x, noise, start, img2img=strength is not None))
    assert len(outputs) == len(calls)  # one yield per model call
    return (outputs[-1] if outputs else x), len(calls)  # DPM adaptive over no range makes no call


def run_reference(k, monkeypatch, source: str, sigma0, img2img: bool, function, denoiser=model, **kwargs):
    noise = ImageNoise(SHAPE, SEEDS, source)
    monkeypatch.setattr(k, "torch", kdiffusion_reference.RandnFromStreams(noise))
    x = initial_x(noise, sigma0, img2img)
    calls = []

    def counted(x, sigma):
        calls.append(float(sigma[0]))
        return denoiser(x, sigma)

    return function(counted, x, **kwargs), len(calls)


@pytest.fixture(scope="module")
def compvis():
    """k-diffusion's CompVisDenoiser of SD1.5's schedule: A1111's model_wrap, for its sigmas."""
    _, external = kdiffusion_reference.load()
    return external.CompVisDenoiser(types.SimpleNamespace(alphas_cumprod=ldm_alphas_cumprod(SD15.schedule)))


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # k-diffusion's torch.tensor(sigma)
@pytest.mark.parametrize("source", ["GPU", "CPU"])
@pytest.mark.parametrize("strength", [None, 0.6, 0.999])  # txt2img; img2img, also from sigma 0
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10])
@pytest.mark.parametrize(
    "label, settings",
    [
        ("DPM fast", {}),
        ("DPM fast", {"eta": 0.0}),
        ("DPM fast", {"eta": 0.5, "s_noise": 0.9}),
        ("DPM adaptive", {}),
        ("DPM adaptive", {"eta": 0.0, "s_noise": 0.9}),  # A1111 does not pass s_noise to DPM adaptive
    ],
)
def test_dpm_fast_and_adaptive_equal_k_diffusion(
    k, compvis, label, settings, steps, strength, source, monkeypatch
) -> None:
    sampler = A1111Sampler(label, steps, MODEL_SIGMAS, **settings)
    # A1111 (sample / sample_img2img): the model's range and n = steps for txt2img; the sliced schedule's
    # last non-zero sigma and first, and its number of steps, for img2img. eta: 1.0 unless set.
    sigmas = compvis.get_sigmas(steps)  # the model's own schedule: Automatic for these two
    assert torch.equal(sampler.sigmas, sigmas)
    kwargs = {"eta": settings.get("eta", 1.0)}
    if label == "DPM fast":
        kwargs["s_noise"] = settings.get("s_noise", 1.0)
    if strength is None:
        run = sigmas
        kwargs.update(sigma_min=compvis.sigmas[0].item(), sigma_max=compvis.sigmas[-1].item(), n=steps)
    else:
        run = sigmas[a1111_start(steps, strength) :]
        kwargs.update(sigma_min=run[-2], sigma_max=run[0], n=len(run) - 1)
    function = k.sample_dpm_fast if label == "DPM fast" else k.sample_dpm_adaptive
    if label == "DPM adaptive":
        del kwargs["n"]
    if strength is not None and len(run) == 2 and kwargs["eta"]:
        # One img2img step: sigma_min == sigma_max, which k-diffusion refuses with eta (so A1111 fails).
        with pytest.raises(ValueError, match="eta must be 0"):
            run_reference(k, monkeypatch, source, run[0], True, function, disable=True, **kwargs)
        with pytest.raises(ValueError, match="eta must be 0"):
            run_a1111_sampler(sampler, source, strength)
        return
    theirs, their_calls = run_reference(
        k, monkeypatch, source, run[0], strength is not None, function, disable=True, **kwargs
    )
    mine, my_calls = run_a1111_sampler(sampler, source, strength)
    assert my_calls == their_calls
    assert_close_to(mine, theirs, f"{label} {settings}, {steps} steps, strength {strength}, {source}")
    start = a1111_start(steps, strength)
    if label == "DPM fast":
        assert sampler.calls_exact and sampler.calls(start) == my_calls == len(run) - 1
    else:
        assert not sampler.calls_exact and sampler.calls(start) == 3 * (len(run) - 1)


def a1111_restart_sampler(k, model, x, sigmas, s_noise=1.0):
    """A1111's sd_samplers_extra.restart_sampler with its default restart list (restart_list=None), written
    out over k-diffusion's get_sigmas_karras, to_d and (A1111's hijacked) torch.randn_like."""
    s_in = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    restart_list = {}
    if steps >= 20:
        restart_steps, restart_times = 9, 1
        if steps >= 36:
            restart_steps, restart_times = steps // 4, 2
        remaining = steps - restart_steps * restart_times
        sigmas = k.get_sigmas_karras(remaining, sigmas[-2].item(), sigmas[0].item())
        restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = k.get_sigmas_karras(
                    restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item()
                )[:-1]
                for _ in range(restart_times):
                    step_list.extend(itertools.pairwise(sigma_restart))
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + k.torch.randn_like(x) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        d = k.to_d(x, old_sigma, model(x, old_sigma * s_in))
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = k.to_d(x_2, new_sigma, model(x_2, new_sigma * s_in))
            x = x + (d + d_2) / 2 * dt
        last_sigma = new_sigma
    return x


@pytest.mark.parametrize("source", ["GPU", "CPU"])
@pytest.mark.parametrize(
    "steps, strength",
    [(1, None), (4, None), (19, None), (20, None), (25, None), (36, None), (40, None), (30, 0.75), (60, 0.7)],
)
@pytest.mark.parametrize("schedule", ["Automatic", "Uniform"])
def test_restart_equals_a1111s_composition(k, steps, strength, schedule, source, monkeypatch) -> None:
    sampler = A1111Sampler("Restart", steps, MODEL_SIGMAS, schedule)
    if schedule == "Automatic":
        karras = k.get_sigmas_karras(steps, MODEL_SIGMAS.sigma_min, MODEL_SIGMAS.sigma_max)
        assert torch.equal(sampler.sigmas, karras)
    run = sampler.sigmas[a1111_start(steps, strength) :]
    theirs, their_calls = run_reference(
        k, monkeypatch, source, run[0], strength is not None, lambda m, x: a1111_restart_sampler(k, m, x, run)
    )
    mine, my_calls = run_a1111_sampler(sampler, source, strength)
    assert my_calls == their_calls == sampler.calls(a1111_start(steps, strength))
    assert_close_to(mine, theirs, f"Restart {schedule}, {steps} steps, strength {strength}, {source}")
    assert sampler.total_steps == 2 * steps and sampler.kwargs() == {}  # A1111 passes it no s_noise


def test_restart_plan_re_runs_the_stretch_from_sigma_2_to_0_1() -> None:
    plan = ours.restart_steps(get_sigmas("karras", 25, MODEL_SIGMAS))
    assert len(plan) == 25  # 16 Karras steps, then 9 restart steps in between
    ups = [i for i in range(1, len(plan)) if plan[i][0] > plan[i - 1][1]]
    assert len(ups) == 1 and float(plan[ups[0]][0]) == pytest.approx(2.0, rel=0.3)
    assert float(plan[ups[0] - 1][1]) == pytest.approx(0.1, rel=0.3)
    plan = ours.restart_steps(get_sigmas("karras", 40, MODEL_SIGMAS))  # twice, 10 + 1 levels each
    assert len(plan) == 40 and sum(plan[i][0] > plan[i - 1][1] for i in range(1, len(plan))) == 2
    assert len(ours.restart_steps(get_sigmas("karras", 19, MODEL_SIGMAS))) == 19  # no restarts under 20


def a1111_lcm_denoiser(external, model, alphas_cumprod):
    """A1111's LCMCompVisDenoiser (sd_samplers_lcm.py) on k-diffusion's DiscreteEpsDDPMDenoiser, the device
    being the CPU; `model(x, t)` is the eps model (apply_model)."""

    class LCMCompVisDenoiser(external.DiscreteEpsDDPMDenoiser):
        def __init__(self):
            timesteps, original_timesteps = 1000, 50
            self.skip_steps = timesteps // original_timesteps
            valid = torch.zeros(original_timesteps, dtype=torch.float32)
            for x in range(original_timesteps):
                valid[original_timesteps - 1 - x] = alphas_cumprod[timesteps - 1 - x * self.skip_steps]
            super().__init__(model, valid, quantize=None)

        def get_sigmas(self, n=None):
            start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
            return k_sampling.append_zero(self.t_to_sigma(torch.linspace(start, end, n)))

        def sigma_to_t(self, sigma, quantize=None):
            dists = sigma.log() - self.log_sigmas[:, None]
            return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip_steps + (self.skip_steps - 1)

        def t_to_sigma(self, timestep):
            t = ((timestep - (self.skip_steps - 1)) / self.skip_steps).float()
            return super().t_to_sigma(torch.clamp(t, min=0, max=len(self.sigmas) - 1))

        def get_eps(self, *args, **kwargs):
            return self.inner_model(*args, **kwargs)

        def get_scaled_out(self, sigma, output, input):
            sigma_data = 0.5
            scaled_timestep = self.sigma_to_t(sigma)[(...,) + (None,) * (output.ndim - 1)] * 10.0
            c_skip = sigma_data**2 / (scaled_timestep**2 + sigma_data**2)
            c_out = scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5
            return c_out * output + c_skip * input

        def forward(self, input, sigma, **kwargs):
            c_out, c_in = [x[(...,) + (None,) * (input.ndim - 1)] for x in self.get_scalings(sigma)]
            eps = self.get_eps(input * c_in, self.sigma_to_t(sigma), **kwargs)
            return self.get_scaled_out(sigma, input + eps * c_out, input)

    k_sampling = kdiffusion_reference.load()[0]
    return LCMCompVisDenoiser()


def a1111_sample_lcm(k, model, x, sigmas):
    """A1111's sample_lcm: the default noise sampler, i.e. the hijacked torch.randn_like."""
    noise_sampler = k.default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for the U-Net's eps(x, t); t as A1111 passes it, (B,), or as ours, 0-d."""
    t = t.reshape(-1, 1, 1, 1) if t.ndim else t
    return 0.4 * torch.sin(x * 0.7 + t / 250) + 0.1 * x


def our_lcm_denoiser(table: LCMSigmas):
    """The pipeline's LCM denoiser as sd.samplers.lcm describes it."""

    def denoised(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = table.sigma_to_t(sigma)
        eps = eps_model(x * (1 / (sigma**2 + 1) ** 0.5), t)
        return lcm_denoised(x, x + eps * -sigma, t)

    return denoised


def test_lcm_table_schedules_and_timesteps_equal_a1111s(k) -> None:
    _, external = kdiffusion_reference.load()
    abar = ldm_alphas_cumprod(SD15.schedule)
    reference = a1111_lcm_denoiser(external, eps_model, abar)
    table = LCMSigmas(abar)
    assert torch.equal(table.sigmas, reference.sigmas) and torch.equal(table.log_sigmas, reference.log_sigmas)
    assert torch.equal(LCMSigmas.from_model(MODEL_SIGMAS).sigmas, table.sigmas)  # the float32 table
    assert torch.equal(table.sigmas, MODEL_SIGMAS.sigmas[19::20])
    for steps in (1, 2, 4, 8, 50, 60):
        for schedule in ("Automatic", "Uniform"):
            sigmas = A1111Sampler("LCM", steps, MODEL_SIGMAS, schedule).sigmas
            assert torch.equal(sigmas, reference.get_sigmas(steps)), (steps, schedule)
    # Other schedule types run over the LCM table's range (A1111: model_wrap.sigmas[0], [-1])
    karras = A1111Sampler("LCM", 6, MODEL_SIGMAS, "Karras").sigmas
    low, high = reference.sigmas[0].item(), reference.sigmas[-1].item()
    assert torch.equal(karras, k.get_sigmas_karras(6, low, high))
    sigmas = torch.exp(torch.linspace(math.log(0.01), math.log(20.0), 997))
    assert torch.equal(table.sigma_to_t(sigmas), reference.sigma_to_t(sigmas))
    ts = torch.linspace(0.0, 1000.0, 1234)
    assert torch.equal(table.t_to_sigma(ts), reference.t_to_sigma(ts))
    # Values, worked out by hand from SD1.5's schedule: the table spans t = 19 .. 999, the top level is the
    # model's sigma_max, and 4 LCM steps visit timesteps 999, 679, 339, 19 (the middle two the levels nearest
    # to the interpolated t = 672.3 and 345.7).
    assert table.sigma_max == MODEL_SIGMAS.sigma_max
    assert table.sigma_min == pytest.approx(0.13445067, rel=1e-6)  # sqrt((1 - abar_19) / abar_19), float64
    four = A1111Sampler("LCM", 4, MODEL_SIGMAS).sigmas
    assert table.sigma_to_t(four[:-1]).tolist() == [999, 679, 339, 19]
    # the boundary condition at t = 19: (10 t)^2 = 36100
    c_skip, c_out = boundary_scalings(torch.tensor(19))
    assert float(c_skip) == pytest.approx(0.25 / 36100.25, rel=1e-6)
    assert float(c_out) == pytest.approx(190 / 36100.25**0.5, rel=1e-6)


@pytest.mark.parametrize("source", ["GPU", "CPU"])
@pytest.mark.parametrize(
    "steps, strength", [(1, None), (2, None), (4, None), (8, None), (8, 0.5), (6, 0.999)]
)
def test_lcm_equals_a1111s_sample_lcm(k, steps, strength, source, monkeypatch) -> None:
    _, external = kdiffusion_reference.load()
    abar = ldm_alphas_cumprod(SD15.schedule)
    reference = a1111_lcm_denoiser(external, eps_model, abar)
    sampler = A1111Sampler("LCM", steps, MODEL_SIGMAS)
    x = torch.randn(len(SEEDS), *SHAPE, generator=torch.Generator().manual_seed(3)) * 3
    sigma = torch.tensor([5.0, 0.3])
    mine = torch.stack([our_lcm_denoiser(sampler.table)(x[i : i + 1], sigma[i])[0] for i in range(2)])
    assert_close_to(mine, reference(x, sigma), "LCM denoiser")
    run = reference.get_sigmas(steps)[a1111_start(steps, strength) :]
    theirs, their_calls = run_reference(
        k, monkeypatch, source, run[0], strength is not None,
        lambda m, x: a1111_sample_lcm(k, m, x, run), denoiser=reference,
    )  # fmt: skip
    mine, my_calls = run_a1111_sampler(sampler, source, strength, our_lcm_denoiser(sampler.table))
    assert my_calls == their_calls == sampler.calls(a1111_start(steps, strength))
    assert_close_to(mine, theirs, f"LCM, {steps} steps, strength {strength}, {source}")


def test_a1111_table_entries_and_aliases() -> None:
    for alias, label in [("k_dpm_fast", "DPM fast"), ("k_dpm_ad", "DPM adaptive"), ("restart", "Restart"),
                         ("k_lcm", "LCM"), ("lcm", "LCM"), ("dpm adaptive", "DPM adaptive")]:  # fmt: skip
        assert sampler_label(alias) == label
    # A1111's order: ... DPM2 a, DPM fast, DPM adaptive, Restart, then its timestep samplers, then LCM
    labels = list(SAMPLERS)
    assert labels[labels.index("DPM2 a") + 1 :][:3] == ["DPM fast", "DPM adaptive", "Restart"]
    assert labels.index("LCM") > labels.index("Restart")
    assert SAMPLERS["DPM fast"].uses_ensd and SAMPLERS["DPM adaptive"].uses_ensd
    assert not SAMPLERS["Restart"].uses_ensd and not SAMPLERS["LCM"].uses_ensd
    assert SAMPLERS["LCM"].denoiser == "lcm" and SAMPLERS["DPM fast"].denoiser == "compvis"
    kwargs = {label: A1111Sampler(label, 10, MODEL_SIGMAS, s_noise=0.9).kwargs() for label in SAMPLERS}
    assert kwargs["DPM fast"] == {"eta": 1.0, "s_noise": 0.9} and kwargs["DPM adaptive"] == {"eta": 1.0}
    assert kwargs["Restart"] == {} and kwargs["LCM"] == {}
    for label in ("DPM fast", "DPM adaptive", "Restart", "LCM"):
        expected = "Karras" if label == "Restart" else "Automatic"
        assert A1111Sampler(label, 10, MODEL_SIGMAS).schedule_label == expected
    fast = A1111Sampler("DPM fast", 10, MODEL_SIGMAS, "Karras")
    model_range = {"sigma_min": MODEL_SIGMAS.sigma_min, "sigma_max": MODEL_SIGMAS.sigma_max}
    assert fast.inputs() == {**model_range, "n": 10}
    img2img = fast.inputs(3)
    assert img2img["n"] == 7 and torch.equal(img2img["sigma_max"], fast.sigmas[3])
    assert torch.equal(img2img["sigma_min"], fast.sigmas[-2])
