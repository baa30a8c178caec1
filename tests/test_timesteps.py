"""sd.samplers.timesteps (A1111's DDIM, DDIM CFG++, PLMS, UniPC) against independent references.

* DDIM and PLMS against diffusers' DDIMScheduler and PNDMScheduler (skip_prk_steps), built from an explicit
  SD1.5 config ("leading" spacing, steps_offset 1, set_alpha_to_one False) with the LDM abar table put in
  (diffusers computes its own table in float32, the checkpoint's is float64 kept as float32: a 1e-7
  relative difference). A1111 never evaluates the list's entry 0 (t = 1): its run of `steps` equals the
  first calls of diffusers' run, which goes one step further, to abar[0]. Same formulas in a different
  order: within 1e-6 of the scale. DDIM is also checked bit for bit against a transcription of A1111's
  loop with its numpy sigma arithmetic.
* UniPC against a transcription of A1111's uni_pc.py as unipc() runs it, kept apart from the module: per
  image time vectors, sort-based interpolation, coefficient lists built with torch.tensor. diffusers'
  UniPCMultistepScheduler does not match A1111: it steps between integer timesteps of the table, while
  A1111 steps uniformly in continuous time (U-Net timesteps 999, 949.05, ...) with abar interpolated in
  log. Identical to float rounding (the test allows 1e-6 of the scale; on the CPU the difference is 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from sd.config import SD15
from sd.noise import ImageNoise
from sd.samplers import timesteps as ts
from sd.samplers.sigmas import ldm_alphas_cumprod

SEEDS = [11, 12]
SHAPE = (4, 6, 5)
ABAR = ldm_alphas_cumprod(SD15.schedule)
TOLERANCE = 1e-6  # of the result's scale, for a reference with other arithmetic

# A1111's numpy-and-torch arithmetic (ndarray / tensor) trips numpy 2's __array_wrap__ deprecation
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")


def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear stand-in for the U-Net's eps; t 0-d (ours) or one per image (references)."""
    s = (t.reshape(-1, 1, 1, 1) if t.ndim else t) / 1000
    return 0.9 * x * (1 - 0.5 * s) + 0.25 * torch.sin(1.3 * x + 4 * s) + 0.1 * s


def uncond_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    s = (t.reshape(-1, 1, 1, 1) if t.ndim else t) / 1000
    return 0.8 * x * (1 - 0.4 * s) - 0.2 * torch.cos(0.9 * x - 2 * s)


def counted(model, log: list[float]):
    def call(x, t):
        log.append(float(t.reshape(-1)[0]))
        return model(x, t)

    return call


def start_noise() -> tuple[ImageNoise, torch.Tensor]:
    noise = ImageNoise(SHAPE, SEEDS)
    return noise, noise.next()


def scale_of(x: torch.Tensor) -> float:
    return float(x.abs().max())


def diffusers_scheduler(kind, steps: int):
    config = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", set_alpha_to_one=False, prediction_type="epsilon",
    )  # fmt: skip
    if kind is DDIMScheduler:
        config["clip_sample"] = False
    else:
        config["skip_prk_steps"] = True
    scheduler = kind(**config)
    scheduler.set_timesteps(steps)
    scheduler.alphas_cumprod = ABAR.clone()
    scheduler.final_alpha_cumprod = ABAR[0].clone()
    return scheduler


# --- timestep lists (a1111-semantics.md §d5) ---------------------------------------------------------


def test_timestep_lists() -> None:
    twenty = ts.ddim_timesteps(20)
    assert twenty.tolist() == list(range(1, 1000, 50))  # [1, 51, ..., 951]
    assert twenty.dtype == torch.int64
    thirty = ts.ddim_timesteps(30)
    assert len(thirty) == 31 and thirty[0] == 1 and thirty[-1] == 991
    assert ts.ddim_timesteps(1000)[-2:].tolist() == [999, 999]  # clipped to the table
    # "always discard next-to-last sigma" only makes the list for steps + 1 (A1111 drops nothing here)
    discarding = ts.TimestepsSampler("DDIM", 20, ABAR, discard_penultimate=True)
    assert torch.equal(discarding.timesteps, ts.ddim_timesteps(21)) and len(discarding.timesteps) == 22
    with pytest.raises(ValueError):
        ts.ddim_timesteps(0)


def test_labels_and_aliases() -> None:
    assert set(ts.TIMESTEPS_SAMPLERS) == {"DDIM", "DDIM CFG++", "PLMS", "UniPC"}
    for alias, label in ts.TIMESTEPS_ALIASES.items():
        assert ts.timesteps_label(alias) == label
        assert ts.timesteps_label(label.upper()) == label
    assert ts.TimestepsSampler("ddim_cfgpp", 20, ABAR).label == "DDIM CFG++"
    with pytest.raises(ValueError, match="unknown A1111 timesteps sampler"):
        ts.timesteps_label("k_ddim")


# --- DDIM ----------------------------------------------------------------------------------------------


def a1111_ddim(model, x, timesteps, noise, eta, abar=ABAR):
    """A1111's ddim loop in its own arithmetic: abar_prev float64, sigmas through numpy, .item() scalars."""
    alphas = abar[timesteps]
    alphas_prev = abar[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    sqrt_one_minus = torch.sqrt(1 - alphas)
    prev_np = alphas_prev.numpy()
    sigmas = eta * np.sqrt((1 - prev_np) / (1 - alphas) * (1 - alphas / prev_np))
    ones, ones_t = x.new_ones((x.shape[0], 1, 1, 1)), x.new_ones(x.shape[0])
    for index in reversed(range(1, len(timesteps))):
        e = model(x, timesteps[index].item() * ones_t)
        a_t, a_prev = alphas[index].item() * ones, alphas_prev[index].item() * ones
        sigma, s = sigmas[index].item() * ones, sqrt_one_minus[index].item() * ones
        x0 = (x - s * e) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma**2).sqrt() * e + sigma * noise()
    return x


@pytest.mark.parametrize("steps", [20, 30])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_equals_diffusers_without_the_last_step(steps: int, eta: float) -> None:
    sampler = ts.TimestepsSampler("DDIM", steps, ABAR, eta=eta)
    noise, x = start_noise()
    log: list[float] = []
    outputs = list(sampler.sample(counted(eps_model, log), x, noise))
    ours = outputs[-1]
    # A1111 evaluates every entry but t = 1, from the top: 20 steps -> 19 calls
    assert log == [float(t) for t in sampler.timesteps.flip(0)[:-1]]
    assert len(outputs) == len(log) == sampler.calls() == len(sampler.timesteps) - 1

    scheduler = diffusers_scheduler(DDIMScheduler, steps)
    if steps == 20:
        assert scheduler.timesteps.tolist() == sampler.timesteps.flip(0).tolist()
    else:  # diffusers' leading grid has 30 entries (1..958); A1111's 31 share its spacing of 33
        scheduler.timesteps = sampler.timesteps.flip(0).clone()
    noise, x = start_noise()
    for t in scheduler.timesteps[:-1]:  # A1111's run stops one step short, at abar[1]
        e = eps_model(x, torch.tensor(float(t)))
        draw = noise.next()
        x = scheduler.step(e, int(t), x, eta=eta, variance_noise=draw).prev_sample
    assert (ours - x).abs().max() <= TOLERANCE * scale_of(x)

    noise, x = start_noise()
    reference = a1111_ddim(eps_model, x, sampler.timesteps, noise.next, eta)
    assert torch.equal(ours, reference)


def test_ddim_draws_the_streams_at_eta_zero() -> None:
    sampler = ts.TimestepsSampler("DDIM", 10, ABAR)
    noise, x = start_noise()
    list(sampler.sample(eps_model, x, noise))
    fresh, _ = start_noise()
    for _ in range(sampler.calls()):
        fresh.next()
    assert torch.equal(noise.next(), fresh.next())  # one draw per step, as A1111's randn_like makes
    assert sampler.infotext == {}
    assert ts.TimestepsSampler("DDIM", 10, ABAR, eta=0.5).infotext == {"Eta DDIM": 0.5}


@pytest.mark.parametrize("eta", [0.0, 0.4])
def test_ddim_cfgpp(eta: float) -> None:
    """x0 from the guided eps, the direction to x_prev from the uncond one; with the two equal it is DDIM."""

    def guided(x, t):
        return uncond_model(x, t) + ts.CFGPP_SCALE * 7 * (eps_model(x, t) - uncond_model(x, t))

    def both(x, t):
        return guided(x, t), uncond_model(x, t)

    sampler = ts.TimestepsSampler("DDIM CFG++", 12, ABAR, eta=eta)
    noise, x = start_noise()
    ours = list(sampler.sample(both, x, noise))[-1]

    noise, x = start_noise()
    a, entries = ABAR, sampler.timesteps.tolist()  # 13 entries: 1, 84, ..., 997
    for t, prev in zip(entries[:0:-1], entries[-2::-1], strict=True):
        tt = torch.tensor(float(t))
        x0 = (x - (1 - a[t]) ** 0.5 * guided(x, tt)) / a[t] ** 0.5
        std = eta * ((1 - a[prev]) / (1 - a[t]) * (1 - a[t] / a[prev])) ** 0.5
        x = a[prev] ** 0.5 * x0 + (1 - a[prev] - std**2) ** 0.5 * uncond_model(x, tt) + std * noise.next()
    assert (ours - x).abs().max() <= TOLERANCE * scale_of(x)

    same = ts.TimestepsSampler("DDIM CFG++", 12, ABAR, eta=eta)
    noise, x = start_noise()
    cfgpp = list(same.sample(lambda x, t: (eps_model(x, t), eps_model(x, t)), x, noise))[-1]
    noise, x = start_noise()
    plain = list(ts.TimestepsSampler("DDIM", 12, ABAR, eta=eta).sample(eps_model, x, noise))[-1]
    assert torch.equal(cfgpp, plain)


# --- PLMS ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [20, 30, 4])
def test_plms_equals_diffusers_pndm_without_the_last_step(steps: int) -> None:
    sampler = ts.TimestepsSampler("PLMS", steps, ABAR)
    noise, x = start_noise()
    log: list[float] = []
    outputs = list(sampler.sample(counted(eps_model, log), x, noise))
    ours = outputs[-1]
    entries = sampler.timesteps.flip(0).tolist()
    # diffusers' PLMS grid: the second entry twice (the pseudo improved Euler step's second call), then
    # each entry down to t = 1; A1111 makes all of these calls but the last
    grid = [entries[0], entries[1], *entries[1:]]
    assert log == grid[:-1]
    assert len(outputs) == len(log) == sampler.calls() == len(sampler.timesteps)

    scheduler = diffusers_scheduler(PNDMScheduler, steps)
    if steps == 20:
        assert scheduler.timesteps.tolist() == grid
    noise, x = start_noise()
    for t in grid[: len(log)]:
        x = scheduler.step(eps_model(x, torch.tensor(float(t))), t, x).prev_sample
    assert (ours - x).abs().max() <= TOLERANCE * scale_of(x)


# --- UniPC: a transcription of A1111's uni_pc.py / UniPCCFG, one time value per image --------------------


def ref_interpolate(x, xp, yp):
    """x (N, 1) through knots xp, yp (1, K): sort x in among the knots, take the neighbouring pair."""
    n, k = x.shape[0], xp.shape[1]
    merged = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((n, 1, 1))], dim=2)
    ordered, where_from = torch.sort(merged, dim=2)
    place = torch.argmin(where_from, dim=2)  # x's rank among the knots
    below = place - 1
    first = torch.where(place == 0, torch.tensor(1), torch.where(place == k, torch.tensor(k - 2), below))
    second = torch.where(first == below, first + 2, first + 1)
    x_lo = torch.gather(ordered, 2, first.unsqueeze(2)).squeeze(2)
    x_hi = torch.gather(ordered, 2, second.unsqueeze(2)).squeeze(2)
    knot = torch.where(place == 0, torch.tensor(0), torch.where(place == k, torch.tensor(k - 2), below))
    ys = yp.unsqueeze(0).expand(n, -1, -1)
    y_lo = torch.gather(ys, 2, knot.unsqueeze(2)).squeeze(2)
    y_hi = torch.gather(ys, 2, (knot + 1).unsqueeze(2)).squeeze(2)
    return y_lo + (x - x_lo) * (y_hi - y_lo) / (x_hi - x_lo)


class RefSchedule:
    def __init__(self, abar):
        self.log_alpha_array = (0.5 * torch.log(abar)).reshape((1, -1))
        self.total_n = len(abar)
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1)[1:].reshape((1, -1))

    def log_mean(self, t):
        return ref_interpolate(t.reshape((-1, 1)), self.t_array, self.log_alpha_array).reshape(-1)

    def std(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_mean(t)))

    def lam(self, t):
        m = self.log_mean(t)
        return m - 0.5 * torch.log(1.0 - torch.exp(2.0 * m))

    def inverse_lambda(self, lam):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,)), -2.0 * lam)
        flipped_a, flipped_t = torch.flip(self.log_alpha_array, [1]), torch.flip(self.t_array, [1])
        return ref_interpolate(log_alpha.reshape((-1, 1)), flipped_a, flipped_t).reshape((-1,))


def col(v):  # (B,) -> (B, 1, 1, 1)
    return v[:, None, None, None]


def ref_unipc(model, x, timesteps, variant, skip_type, order, lower_order_final, img2img, log, abar=ABAR):
    ns = RefSchedule(abar)
    steps, batch = len(timesteps), x.shape[0]
    assert steps >= order

    def data(x, t):
        t_in = (t - 1.0 / ns.total_n) * 1000.0
        log.append(float(t_in[0]))
        e = model(x, t_in)
        return (x - col(ns.std(t)) * e) / col(torch.exp(ns.log_mean(t)))

    def bh_update(x, models, times, t, order, use_corrector):
        lambda_0, lambda_t = ns.lam(times[-1]), ns.lam(t)
        sigma_0, sigma_t = ns.std(times[-1]), ns.std(t)
        alpha_t = torch.exp(ns.log_mean(t))
        h = lambda_t - lambda_0
        rks, d1s = [], []
        for i in range(1, order):
            rk = ((ns.lam(times[-(i + 1)]) - lambda_0) / h)[0]
            rks.append(rk)
            d1s.append((models[-(i + 1)] - models[-1]) / rk)
        rks.append(1.0)
        rks = torch.tensor(rks)
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        big_r, b, fact = [], [], 1
        for i in range(1, order + 1):
            big_r.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * fact / b_h)
            fact *= i + 1
            h_phi_k = h_phi_k / hh - 1 / fact
        big_r, b = torch.stack(big_r), torch.tensor(b)
        d1s = torch.stack(d1s, dim=1) if d1s else None
        if d1s is not None:
            rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1])
        x_t_ = col(sigma_t / sigma_0) * x - col(alpha_t * h_phi_1) * models[-1]
        pred = torch.einsum("k,bkchw->bchw", rhos_p, d1s) if d1s is not None else 0
        x_t = x_t_ - col(alpha_t * b_h) * pred
        model_t = None
        if use_corrector:
            rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(big_r, b)
            model_t = data(x_t, t)
            corr = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1s) if d1s is not None else 0
            x_t = x_t_ - col(alpha_t * b_h) * (corr + rhos_c[-1] * (model_t - models[-1]))
        return x_t, model_t

    def vary_update(x, models, times, t, order, use_corrector):  # batch of one, as A1111 can run it
        lambda_0 = ns.lam(times[-1])
        sigma_0, sigma_t = ns.std(times[-1]), ns.std(t)
        alpha_t = torch.exp(ns.log_mean(t))
        h = ns.lam(t) - lambda_0
        rks, d1s = [], []
        for i in range(1, order):
            rk = (ns.lam(times[-(i + 1)]) - lambda_0) / h
            rks.append(float(rk))
            d1s.append((models[-(i + 1)] - models[-1]) / rk)
        rks = torch.tensor([*rks, 1.0])
        big_k = len(rks)
        c, column = [], torch.ones_like(rks)
        for k in range(1, big_k + 1):
            c.append(column)
            column = column * rks / (k + 1)
        c = torch.stack(c, dim=1)
        if d1s:
            d1s = torch.stack(d1s, dim=1)
            a_p = torch.linalg.inv(c[:-1, :-1])
        hh = -h
        phis, phi, fact = [], torch.expm1(hh), 1
        for k in range(1, big_k + 2):
            phis.append(phi)
            phi = phi / hh - 1 / fact
            fact *= k + 1
        x_t_ = sigma_t / sigma_0 * x - alpha_t * phis[0] * models[-1]
        x_t = x_t_
        for k in range(big_k - 1):
            x_t = x_t - alpha_t * phis[k + 1] * torch.einsum("bkchw,k->bchw", d1s, a_p[k])
        model_t = None
        if use_corrector:
            a_c = torch.linalg.inv(c)
            model_t = data(x_t, t)
            x_t, k = x_t_, 0
            for k in range(big_k - 1):
                x_t = x_t - alpha_t * phis[k + 1] * torch.einsum("bkchw,k->bchw", d1s, a_c[k][:-1])
            x_t = x_t - alpha_t * phis[big_k] * ((model_t - models[-1]) * a_c[k][-1])
        return x_t, model_t

    update = vary_update if variant == "vary_coeff" else bh_update
    t_0 = 1.0 / ns.total_n
    t_top = timesteps[-1] / 1000 + 1 / 1000 if img2img else 1.0
    if skip_type == "logSNR":
        lam_top = ns.lam(torch.tensor(float(t_top))).item()
        grid = ns.inverse_lambda(torch.linspace(lam_top, ns.lam(torch.tensor(t_0)).item(), steps + 1))
    elif skip_type == "time_uniform":
        grid = torch.linspace(float(t_top), t_0, steps + 1)
    else:
        grid = torch.linspace(float(t_top**0.5), t_0**0.5, steps + 1).pow(2)
    vec = grid[0].expand(batch)
    models, times, outputs = [data(x, vec)], [vec], []
    for warm in range(1, order):
        vec = grid[warm].expand(batch)
        x, m = update(x, models, times, vec, warm, True)
        outputs.append(x)
        models.append(m)
        times.append(vec)
    for step in range(order, steps + 1):
        vec = grid[step].expand(batch)
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, m = update(x, models, times, vec, step_order, step != steps)
        outputs.append(x)
        for i in range(order - 1):
            times[i], models[i] = times[i + 1], models[i + 1]
        times[-1] = vec
        if step < steps:
            models[-1] = m
    return outputs


UNIPC_CASES = {
    # name: (steps, options, img2img strength or None, batch)
    "defaults 20": (20, {}, None, 2),
    "defaults 30 (31 entries)": (30, {}, None, 2),
    "defaults 3": (3, {}, None, 2),
    "bh2": (12, {"unipc_variant": "bh2"}, None, 2),
    "vary_coeff": (12, {"unipc_variant": "vary_coeff"}, None, 1),
    "time_quadratic": (12, {"unipc_skip_type": "time_quadratic"}, None, 2),
    "logSNR": (12, {"unipc_skip_type": "logSNR"}, None, 2),
    "order 2": (10, {"unipc_order": 2}, None, 2),
    "order 1": (6, {"unipc_order": 1}, None, 2),
    "order 4, not lower final": (10, {"unipc_order": 4, "unipc_lower_order_final": False}, None, 2),
    "27 steps": (27, {}, None, 2),
    "img2img 0.6": (20, {}, 0.6, 2),
    "img2img quadratic 0.5": (20, {"unipc_skip_type": "time_quadratic"}, 0.5, 2),
    "img2img logSNR 0.75": (20, {"unipc_skip_type": "logSNR"}, 0.75, 2),
}


@pytest.mark.parametrize("case", list(UNIPC_CASES))
def test_unipc_equals_a1111_transcription(case: str) -> None:
    steps, options, strength, batch = UNIPC_CASES[case]
    sampler = ts.TimestepsSampler("UniPC", steps, ABAR, **options)
    start = sampler.img2img_start(strength) if strength else 0
    x = ImageNoise(SHAPE, SEEDS[:batch]).next()
    log: list[float] = []
    ours = list(sampler.sample(counted(eps_model, log), x, start=start))
    their_log: list[float] = []
    run = sampler.timesteps[: len(sampler.timesteps) - start]
    settings = (
        options.get("unipc_variant", "bh1"), options.get("unipc_skip_type", "time_uniform"),
        options.get("unipc_order", 3), options.get("unipc_lower_order_final", True),
    )  # fmt: skip
    theirs = ref_unipc(eps_model, x, run, *settings, start > 0, their_log)
    assert log == their_log
    assert len(ours) == len(theirs) == len(log) == sampler.calls(start)
    for mine, reference in zip(ours, theirs, strict=True):
        assert (mine - reference).abs().max() <= TOLERANCE * scale_of(reference), case
    if not strength and options.get("unipc_skip_type", "time_uniform") == "time_uniform":
        # fractional U-Net timesteps: 999, then 999 - 999 / n for n = len(timesteps) steps
        assert log[0] == 999.0 and log[1] == pytest.approx(999 - 999 / len(sampler.timesteps), abs=1e-3)


def test_old_fp16_alphas() -> None:
    """A1111 before v1.7.0-225 kept abar in fp16 ("Downcast alphas_cumprod"): the same code on fp16 tables."""
    half = ldm_alphas_cumprod(SD15.schedule, downcast=True)
    sampler = ts.TimestepsSampler("DDIM", 20, half, eta=0.7)
    noise, x = start_noise()
    ours = list(sampler.sample(eps_model, x, noise))[-1]
    noise, x = start_noise()
    assert torch.equal(ours, a1111_ddim(eps_model, x, sampler.timesteps, noise.next, 0.7, half))
    unipc = ts.TimestepsSampler("UniPC", 20, half, unipc_skip_type="logSNR")
    x = ImageNoise(SHAPE, SEEDS).next()
    ours = list(unipc.sample(eps_model, x))[-1]
    theirs = ref_unipc(eps_model, x, unipc.timesteps, "bh1", "logSNR", 3, True, False, [], half)[-1]
    assert (ours - theirs).abs().max() <= TOLERANCE * scale_of(theirs)
    assert ours.dtype == torch.float32


def test_unipc_refuses_fewer_steps_than_its_order() -> None:
    sampler = ts.TimestepsSampler("UniPC", 2, ABAR)
    with pytest.raises(ValueError, match="UniPC order must be < sampling steps"):
        sampler.calls()
    with pytest.raises(ValueError, match="UniPC order must be < sampling steps"):
        list(sampler.sample(eps_model, torch.zeros(1, *SHAPE)))
    twenty = ts.TimestepsSampler("UniPC", 20, ABAR)
    with pytest.raises(ValueError, match="UniPC order"):
        twenty.calls(twenty.img2img_start(0.1))  # t_enc 2 < order 3 (A1111 fails the same way)
    with pytest.raises(ValueError, match="bad UniPC settings"):
        ts.TimestepsSampler("UniPC", 20, ABAR, unipc_skip_type="karras")


# --- img2img ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strength, t_enc, noised_at, first_call",
    [(0.75, 15, 751, 701), (0.5, 10, 501, 451), (0.3, 6, 301, 251), (1.0, 19, 951, 901), (0.04, 0, 1, None)],
)
def test_img2img_slicing(strength: float, t_enc: int, noised_at: int, first_call: int | None) -> None:
    """t_enc = int(min(strength, 0.999) * steps); the run is timesteps[:t_enc], from x0 noised to
    abar[timesteps[t_enc]] (one entry above the first one evaluated, A1111's choice)."""
    assert ts.setup_img2img_steps(20, strength)[1] == t_enc
    x0 = torch.linspace(-1, 1, 2 * 4 * 6 * 5).reshape(2, *SHAPE)
    for label, calls in [("DDIM", max(t_enc - 1, 0)), ("PLMS", t_enc if t_enc >= 2 else 0)]:
        sampler = ts.TimestepsSampler(label, 20, ABAR)
        start = sampler.img2img_start(strength)
        assert start == 20 - t_enc
        noise, draw = start_noise()
        x = sampler.img2img_latent(x0, draw, start)
        a = ABAR[noised_at]
        assert torch.equal(x, x0 * torch.sqrt(a) + draw * torch.sqrt(1 - a))
        log: list[float] = []
        outputs = list(sampler.sample(counted(eps_model, log), x, noise, start))
        assert len(log) == len(outputs) == calls == sampler.calls(start)
        if first_call is not None:
            assert log[0] == first_call and log[-1] == 51
        else:
            assert log == [] and outputs == []  # A1111 returns the noised latent as it is
    if t_enc >= 3:
        unipc = ts.TimestepsSampler("UniPC", 20, ABAR)
        log = []
        list(
            unipc.sample(counted(eps_model, log), torch.zeros(1, *SHAPE), start=unipc.img2img_start(strength))
        )
        # continuous time from timesteps[t_enc - 1] / 1000 + 1 / 1000: the first call near that entry
        assert len(log) == t_enc and log[0] == pytest.approx(first_call, abs=1e-3)


def test_img2img_steps_with_explicit_steps() -> None:
    """The hires pass (explicit steps) and "img2img_fix_steps": a longer schedule, t_enc = requested - 1."""
    assert ts.setup_img2img_steps(20, 0.5, explicit_steps=10) == (20, 9)
    assert ts.setup_img2img_steps(20, 0.7, fix_steps=True) == (28, 19)
    assert ts.setup_img2img_steps(20, 0.0, explicit_steps=10) == (0, 9)
    assert ts.setup_img2img_steps(20, 1.0) == (20, 19)


def test_calls_and_total_steps() -> None:
    for steps, entries in [(20, 20), (30, 31), (7, 8)]:
        ddim, plms, unipc = (ts.TimestepsSampler(label, steps, ABAR) for label in ("DDIM", "PLMS", "UniPC"))
        assert len(ddim.timesteps) == entries
        assert (ddim.calls(), plms.calls(), unipc.calls()) == (entries - 1, entries, entries)
        assert ddim.total_steps == plms.total_steps == unipc.total_steps == steps
