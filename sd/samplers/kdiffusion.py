"""k-diffusion's samplers, as A1111 runs them: one short generator function each, over a denoiser.

    model(x, sigma) -> denoised      D(x; sigma), the x0 prediction at VE noise level sigma (a 0-d tensor)
    noise() -> Tensor                the next draw of every image's own stream, shaped like x (A1111's
                                     ImageNoise.next, standing in for k-diffusion's torch.randn_like)
    brownian(sigma, sigma_next)      the SDE samplers' Brownian-tree increment, normalised to unit variance

Each function yields x after every model call (the last yield is the result). The arithmetic is
k-diffusion 0.1.1's (sampling.py, which A1111 v1.10.1 pins), operation for operation, so results agree with
it to float rounding; A1111's wiring choices (which draws happen, eta defaults) are kept: Euler, Heun and
DPM2 draw their churn noise every step even when churn is off, consuming it from the streams as A1111 does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from scipy import integrate
from torch import Tensor

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


__all__ = [
    "ancestral_step",
    "dpm_2",
    "dpm_2_ancestral",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2s_ancestral",
    "dpmpp_3m_sde",
    "dpmpp_sde",
    "euler",
    "euler_ancestral",
    "heun",
    "lms",
    "to_d",
]
