"""sd.samplers.kdiffusion and sd.samplers.sigmas against k-diffusion 0.1.1.post1, wired as A1111 wires it.

k-diffusion's own `sampling.py` (installed from PyPI with --no-deps; a1111-semantics.md §h) runs with the
same denoiser, the same sigmas, the same per-image noise streams in place of `torch.randn_like`, and Brownian
trees seeded per image with torchsde's draws taken from the RNG source. Same operations in the same order:
the results must be identical (max |difference| 0; the test allows 1e-6 of the scale for the platform).
Schedules are checked against k-diffusion's functions and the values a1111-semantics.md §d2 prints.
"""

from __future__ import annotations

import pytest
import torch

from sd.config import SD15
from sd.noise import BrownianNoise, ImageNoise, _torchsde_draws_from
from sd.samplers import kdiffusion as ours
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
