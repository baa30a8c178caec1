"""k-diffusion's samplers, as A1111 runs them: one short generator function each, over a denoiser.

    model(x, sigma) -> denoised      D(x; sigma), the x0 prediction at VE noise level sigma (a 0-d tensor)
    noise() -> Tensor                the next draw of every image's own stream, shaped like x (A1111's
                                     ImageNoise.next, standing in for k-diffusion's torch.randn_like)
    brownian(sigma, sigma_next)      the SDE samplers' Brownian-tree increment, normalised to unit variance

Each function yields x after every model call (the last yield is the result). The arithmetic is
k-diffusion 0.1.1's (sampling.py, which A1111 v1.10.1 pins), operation for operation, so results agree with
it to float rounding; A1111's wiring choices (which draws happen, eta defaults) are kept: Euler, Heun and
DPM2 draw their churn noise every step even when churn is off, consuming it from the streams as A1111 does,
and so do DPM fast (every step) and DPM adaptive (every accepted step) at eta 0. Restart and LCM are A1111's
own (sd_samplers_extra.py, sd_samplers_lcm.py), over the same primitives.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Generator, Iterator

import torch
from scipy import integrate
from torch import Tensor

from sd.samplers.sigmas import karras

Denoiser = Callable[[Tensor, Tensor], Tensor]
Noise = Callable[[], Tensor]
Brownian = Callable[[Tensor, Tensor], Tensor]


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE's dx/dsigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor | float]:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add noise of std sigma_up."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _churn(
    x: Tensor, sigmas: Tensor, i: int, noise: Noise,
    s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Karras' churn: raise the noise level to sigma_hat (the draw is made even when churn is off)."""
    gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    eps = noise() * s_noise
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def euler(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
) -> Iterator[Tensor]:  # fmt: skip
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 2)."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        d = to_d(x, sigma_hat, model(x, sigma_hat))
        x = x + d * (sigmas[i + 1] - sigma_hat)
        yield x


def euler_ancestral(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, eta: float = 1.0, s_noise: float = 1.0
) -> Iterator[Tensor]:
    """Euler to sigma_down, then fresh noise of std sigma_up."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise() * s_noise * sigma_up
        yield x


def heun(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
) -> Iterator[Tensor]:  # fmt: skip
    """Heun's method (Karras et al. 2022, Algorithm 2); the last step, to sigma 0, is Euler's."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        d = to_d(x, sigma_hat, model(x, sigma_hat))
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            yield x_2
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        yield x


def dpm_2(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
) -> Iterator[Tensor]:  # fmt: skip
    """DPM-Solver-2 in Karras' setting: a half step to the log-midpoint sigma, then the full step."""
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        d = to_d(x, sigma_hat, model(x, sigma_hat))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            yield x_2
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
        yield x


def dpm_2_ancestral(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, eta: float = 1.0, s_noise: float = 1.0
) -> Iterator[Tensor]:
    """DPM-Solver-2 steps to sigma_down, then fresh noise of std sigma_up."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            yield x_2
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise() * s_noise * sigma_up
        yield x


def _lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """The integral over [t_i, t_i+1] of the Lagrange basis polynomial of node i - j."""

    def basis(tau: float) -> float:
        product = 1.0
        for k in range(order):
            if j != k:
                product *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return product

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def lms(model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, order: int = 4) -> Iterator[Tensor]:
    """Linear multistep (Adams-Bashforth in sigma) of up to `order` previous slopes."""
    nodes = sigmas.detach().cpu().numpy()
    slopes: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        slopes = [*slopes, to_d(x, sigmas[i], model(x, sigmas[i]))][-order:]
        current = min(i + 1, order)
        coefficients = [_lms_coefficient(current, nodes, i, j) for j in range(current)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(slopes), strict=True))
        yield x


def _t(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


def dpmpp_2s_ancestral(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, eta: float = 1.0, s_noise: float = 1.0
) -> Iterator[Tensor]:
    """DPM-Solver++(2S) single-step second order to sigma_down, then fresh noise of std sigma_up."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h * 0.5).expm1() * denoised
            yield x_2
            denoised_2 = model(x_2, _sigma(s))
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise() * s_noise * sigma_up
        yield x


def dpmpp_sde(
    model: Denoiser, x: Tensor, sigmas: Tensor, brownian: Brownian,
    eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
) -> Iterator[Tensor]:  # fmt: skip
    """DPM-Solver++ stochastic, second order: an SDE substep to the r-point, then the full step."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            sd, su = ancestral_step(_sigma(t), _sigma(s), eta)
            s_ = _t(sd)
            x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + brownian(_sigma(t), _sigma(s)) * s_noise * su
            yield x_2
            denoised_2 = model(x_2, _sigma(s))
            sd, su = ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_next_ = _t(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + brownian(_sigma(t), _sigma(t_next)) * s_noise * su
        yield x


def dpmpp_2m(model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise) -> Iterator[Tensor]:
    """DPM-Solver++(2M): second-order multistep on the data prediction."""
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        yield x


def dpmpp_2m_sde(
    model: Denoiser, x: Tensor, sigmas: Tensor, brownian: Brownian,
    eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
) -> Iterator[Tensor]:  # fmt: skip
    """DPM-Solver++(2M) SDE; `solver_type` "heun" is A1111's "DPM++ 2M SDE Heun"."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError("solver_type must be 'heun' or 'midpoint'")
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                change = denoised - old_denoised
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * change
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * change
            if eta:
                noise_scale = (-2 * eta_h).expm1().neg().sqrt()
                x = x + brownian(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * noise_scale * s_noise
            h_last = h
        old_denoised = denoised
        yield x


def dpmpp_3m_sde(
    model: Denoiser, x: Tensor, sigmas: Tensor, brownian: Brownian, eta: float = 1.0, s_noise: float = 1.0
) -> Iterator[Tensor]:
    """DPM-Solver++(3M) SDE: third-order multistep on the data prediction."""
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if eta:
                noise_scale = (-2 * h * eta).expm1().neg().sqrt()
                x = x + brownian(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * noise_scale * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        yield x


# DPM-Solver (Lu et al. 2022) as k-diffusion's DPMSolver runs it: steps in t = -log(sigma) on the noise
# prediction eps = (x - D(x; sigma)) / sigma. A1111 gives these two a sigma range, not a schedule.


def _eps(model: Denoiser, x: Tensor, t: Tensor) -> Tensor:
    return (x - model(x, _sigma(t))) / _sigma(t)


def _dpm_solver_step(
    model: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, order: int
) -> Generator[Tensor, None, tuple[Tensor, Tensor | None]]:
    """DPM-Solver-`order` (1 to 3) from t to t_next, given eps at (x, t): yields the point of each further
    model call, returns (x at t_next, the solution one order lower from the same calls: DPM adaptive's
    error estimate; None at order 1)."""
    h = t_next - t
    x_1 = x - _sigma(t_next) * h.expm1() * eps
    if order == 1:
        return x_1, None
    r1 = 1 / 2 if order == 2 else 1 / 3
    s1 = t + r1 * h
    u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
    yield u1
    eps_r1 = _eps(model, u1, s1)
    x_2 = x_1 - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
    if order == 2:
        return x_2, x_1
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = x - _sigma(s2) * (r2 * h).expm1() * eps
    u2 = u2 - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
    yield u2
    eps_r2 = _eps(model, u2, s2)
    return x_1 - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps), x_2


def _dpm_ancestral(t: Tensor, t_next: Tensor, t_end: Tensor, eta: float) -> tuple[Tensor, Tensor | float]:
    """(where the deterministic part of a step from t to t_next ends, never past t_end; the std of the noise
    added after it)."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = ancestral_step(_sigma(t), _sigma(t_next), eta)
    t_down = torch.minimum(t_end, _t(sigma_down))
    return t_down, (_sigma(t_next) ** 2 - _sigma(t_down) ** 2) ** 0.5


def _t_range(sigma_min: float | Tensor, sigma_max: float | Tensor) -> tuple[Tensor, Tensor]:
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError("sigma_min and sigma_max must not be 0")
    # float32 0-d tensors on the CPU, as k-diffusion's torch.tensor(sigma) makes them
    return _t(torch.tensor(float(sigma_max))), _t(torch.tensor(float(sigma_min)))


def dpm_fast(
    model: Denoiser, x: Tensor, sigma_min: float | Tensor, sigma_max: float | Tensor, n: int, noise: Noise,
    eta: float = 0.0, s_noise: float = 1.0,
) -> Iterator[Tensor]:  # fmt: skip
    """DPM-Solver-Fast: n model calls in third-order steps evenly spaced in t from sigma_max to sigma_min
    (the last one or two of lower order); ends at sigma_min, not 0. Draws noise every step, eta 0 or not."""
    t_start, t_end = _t_range(sigma_min, sigma_max)
    if not t_end > t_start and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    m = math.floor(n / 3) + 1
    ts = torch.linspace(t_start, t_end, m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t_step, sigma_up = _dpm_ancestral(ts[i], ts[i + 1], t_end, eta)
        x, _ = yield from _dpm_solver_step(model, x, ts[i], t_step, _eps(model, x, ts[i]), order)
        x = x + sigma_up * s_noise * noise()
        yield x


class _StepSizeController:
    """k-diffusion's PID step-size controller: scales h by a limited product of powers of 1 / error."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float, eps: float = 1e-8):  # fmt: skip
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []  # inverse errors: this step's, the last accepted, the one before

    def propose_step(self, error: Tensor) -> bool:
        """Whether to accept the step just tried; updates h either way."""
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def dpm_adaptive(
    model: Denoiser, x: Tensor, sigma_min: float | Tensor, sigma_max: float | Tensor, noise: Noise,
    order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
    icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 0.0,
    s_noise: float = 1.0,
) -> Iterator[Tensor]:  # fmt: skip
    """DPM-Solver-23 (or -12 at `order` 2) with adaptive step size from sigma_max to sigma_min: each try
    makes `order` model calls, as many tries as the error control needs (the error is over the whole
    batch, so the steps depend on it). Draws noise at every accepted step, eta 0 or not. Over an empty
    range (sigma_min == sigma_max: img2img of one step) it makes no call and yields nothing: x is the
    result."""
    if order not in (2, 3):
        raise ValueError("order should be 2 or 3")
    t_start, t_end = _t_range(sigma_min, sigma_max)
    forward = t_end > t_start
    if not forward and eta:
        raise ValueError("eta must be 0 for reverse sampling")
    pid = _StepSizeController(abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff,
                              1.5 if eta else order, accept_safety)  # fmt: skip
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    s, x_prev = t_start, x
    while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
        t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
        t_step, sigma_up = _dpm_ancestral(s, t, t_end, eta)
        x_high, x_low = yield from _dpm_solver_step(model, x, s, t_step, _eps(model, x, s), order)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + sigma_up * s_noise * noise()
            s = t
        yield x


# A1111's default restart plan (sd_samplers_extra.restart_sampler): re-run the stretch from sigma ~2 down to
# ~0.1 after re-noising, once from 20 steps on, twice from 36.
RESTART_AT, RESTART_FROM = 0.1, 2.0


def restart_steps(sigmas: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The (sigma, sigma_next) of every Heun step of a Restart run over `sigmas`, in order. Under 20 steps
    they are the schedule's own; from 20 on, the schedule is remade as Karras between its first and last
    non-zero sigma over the steps the restarts leave."""
    steps = len(sigmas) - 1
    if steps < 20:
        return list(itertools.pairwise(sigmas))
    segment, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    sigmas = karras(steps - segment * times, sigmas[-2].item(), sigmas[0].item())
    plan = list(itertools.pairwise(sigmas))
    low = int(torch.argmin(abs(sigmas - RESTART_AT), dim=0))
    high = int(torch.argmin(abs(sigmas - RESTART_FROM), dim=0))
    if high < low:
        again = karras(segment + 1, sigmas[low].item(), sigmas[high].item())[:-1]
        plan[low:low] = list(itertools.pairwise(again)) * times  # after the step to sigmas[low]
    return plan


def restart_calls(sigmas: Tensor) -> int:
    """Model calls of a Restart run over `sigmas`: two a Heun step, one for a step to sigma 0."""
    return sum(1 if sigma_next == 0 else 2 for _, sigma_next in restart_steps(sigmas))


def restart(
    model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise, s_noise: float = 1.0
) -> Iterator[Tensor]:
    """Restart sampling (Xu et al. 2023) as A1111 runs it: Heun steps over `restart_steps`, and where a step
    starts above the level the last one reached, fresh noise first to make up the difference in variance."""
    last = None
    for sigma, sigma_next in restart_steps(sigmas):
        if last is not None and last < sigma:
            x = x + noise() * s_noise * (sigma**2 - last**2) ** 0.5
        d = to_d(x, sigma, model(x, sigma))
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            yield x_2
            d_2 = to_d(x_2, sigma_next, model(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        yield x
        last = sigma_next


def lcm(model: Denoiser, x: Tensor, sigmas: Tensor, noise: Noise) -> Iterator[Tensor]:
    """A1111's LCM: each step jumps to the denoised image and noises it afresh to the next level. `model`
    must be LCM's denoiser (sd.samplers.lcm), not the plain CompVis one."""
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise()
        yield x


__all__ = [
    "ancestral_step",
    "dpm_2",
    "dpm_2_ancestral",
    "dpm_adaptive",
    "dpm_fast",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2s_ancestral",
    "dpmpp_3m_sde",
    "dpmpp_sde",
    "euler",
    "euler_ancestral",
    "heun",
    "lcm",
    "lms",
    "restart",
    "restart_calls",
    "restart_steps",
    "to_d",
]
