"""sd.noise: A1111's random sources and per-image streams.

Philox is pinned by Random123's known-answer vectors (philox4x32_10) and by the values A1111's own
emulator printed (a1111-semantics.md §c3, rounded there to 8 significant digits: compared to 1e-7).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sd.noise import ImageNoise, PhiloxGenerator, check_source, philox4x32, philox_randn, randn_seeded, slerp

SHAPE = (4, 8, 8)


@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        (
            [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
            [0xA4093822, 0x299F31D0],
            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
        ),
    ],
)
def test_philox_known_answers(counter, key, expected) -> None:
    out = philox4x32(np.array(counter, dtype=np.uint32).reshape(4, 1), np.array(key, dtype=np.uint32))
    assert out[:, 0].tolist() == expected


def test_a1111_emulator_values() -> None:
    # (spec) seed 0, (3, 4)
    expected = [[-0.9246624, -0.42534396, -2.6438458, 0.14518388],
                [-0.12086651, -0.5797257, -0.6228513, -0.32838714],
                [-1.074542, -0.3631441, -1.6710504, 2.265505]]  # fmt: skip
    np.testing.assert_allclose(philox_randn(0, (3, 4)), expected, rtol=0, atol=1e-7)
    stream = PhiloxGenerator(1234)
    first, second = stream.randn((4, 64, 64)), stream.randn((4, 64, 64))
    np.testing.assert_allclose(
        first.flatten()[:4], [-1.6164904, 0.5684552, -0.5102246, -0.9113394], atol=1e-7
    )
    np.testing.assert_allclose(second.flatten()[:4], [0.6330828, 1.6358219, -0.3458629, 1.0195528], atol=1e-7)
    # a 64-bit seed: the high word is the second key word
    np.testing.assert_allclose(
        philox_randn(2**32 + 5, (4,)), [-2.8427475, 1.3404924, 0.2722309, 1.4550629], atol=1e-7
    )
    assert first.dtype == torch.float32


def test_counter_layout() -> None:
    # element j is subsequence j: the value at j does not depend on the shape or on how many follow
    assert np.array_equal(philox_randn(7, (100,))[:10], philox_randn(7, (10,)))
    assert np.array_equal(philox_randn(7, (2, 5)).ravel(), philox_randn(7, (10,)))
    # each call of a stream is the next offset; seeds differ in the key only
    stream = PhiloxGenerator(7)
    stream.randn((3,))
    assert np.array_equal(stream.randn((3,)).numpy(), philox_randn(7, (3,), offset=1))
    assert not np.array_equal(philox_randn(7, (3,)), philox_randn(8, (3,)))
    big = philox_randn(3, (1_000_000,))
    assert abs(float(big.mean())) < 5e-3 and abs(float(big.std()) - 1) < 5e-3


def test_cpu_source_is_torchs_cpu_generator() -> None:
    # (spec) torch's CPU stream for seed 1234 starts [-0.11171857, -0.4965901, 0.1630737, -0.88168776]
    noise = ImageNoise((4, 64, 64), [1234], "cpu").next()
    np.testing.assert_allclose(
        noise.flatten()[:4], [-0.11171857, -0.4965901, 0.1630737, -0.88168776], atol=1e-7
    )
    assert torch.equal(noise[0], torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(1234)))
    with pytest.raises(ValueError, match="RNG source must be one of GPU, CPU, NV"):
        check_source("tpu")
    assert check_source("nv") == "NV"


@pytest.mark.parametrize("source", ["GPU", "CPU"])
def test_one_stream_per_image_and_later_draws_continue_it(source) -> None:
    batch = ImageNoise(SHAPE, [10, 11, 12], source)
    first, second = batch.next(), batch.next()
    for i, seed in enumerate([10, 11, 12]):
        alone = ImageNoise(SHAPE, [seed], source)
        assert torch.equal(alone.next()[0], first[i]) and torch.equal(alone.next()[0], second[i])
    assert not torch.equal(first, second)


def test_ensd_replaces_the_streams_after_the_first_draw() -> None:
    plain, shifted = ImageNoise(SHAPE, [5, 6]), ImageNoise(SHAPE, [5, 6], ensd=31337)
    assert torch.equal(plain.next(), shifted.next())  # the initial noise is the seed's
    later = shifted.next()
    assert torch.equal(later[0], randn_seeded("GPU", 5 + 31337, SHAPE))
    assert torch.equal(later[1], randn_seeded("GPU", 6 + 31337, SHAPE))


def test_variation_seed_is_a1111s_slerp_along_h() -> None:
    noise = ImageNoise(SHAPE, [5], subseeds=[9], subseed_strength=0.3).next()[0]
    low, high = randn_seeded("GPU", 5, SHAPE), randn_seeded("GPU", 9, SHAPE)
    # a direct evaluation of the formula on each (channel, column) vector along H
    expected = torch.empty(SHAPE)
    for c in range(SHAPE[0]):
        for x in range(SHAPE[2]):
            a, b = low[c, :, x].double(), high[c, :, x].double()
            omega = torch.acos((a / a.norm() * b / b.norm()).sum())
            expected[c, :, x] = (torch.sin(0.7 * omega) * a + torch.sin(0.3 * omega) * b) / torch.sin(omega)
    torch.testing.assert_close(noise, expected, rtol=0, atol=1e-5)
    # nearly parallel vectors: the fallback is low * v + high * (1 - v) (reversed, as in A1111)
    assert torch.equal(slerp(0.3, low, low * 1.0001), low * 0.3 + low * 1.0001 * 0.7)
    # strength 0 is no variation at all
    assert torch.equal(ImageNoise(SHAPE, [5], subseeds=[9], subseed_strength=0.0).next()[0], low)


def test_seed_resize_pastes_the_smaller_noise_centred() -> None:
    # a 64x64 image made from the noise a 32x48 one (width x height) would have had
    noise = ImageNoise(SHAPE, [5], seed_resize_from=(32, 48)).next()[0]
    small = randn_seeded("GPU", 5, (4, 6, 4))
    full = randn_seeded("GPU", 5, SHAPE)  # the stream's own first draw, under the pasted part
    assert torch.equal(noise[:, 1:7, 2:6], small)
    assert torch.equal(noise[:, 0], full[:, 0]) and torch.equal(noise[:, :, :2], full[:, :, :2])
    # larger than the image: its centre is cropped
    noise = ImageNoise(SHAPE, [5], seed_resize_from=(96, 64)).next()[0]
    assert torch.equal(noise, randn_seeded("GPU", 5, (4, 8, 12))[:, :, 2:10])
