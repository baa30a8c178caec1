"""`sd serve` under load and abuse, and driven by a real A1111 client library (webuiapi).

Every test talks to 127.0.0.1 only, with the tiny random model, and is bounded in time: many clients at
once, clients that vanish mid-job, truncated and stalled bodies, garbage on the socket, auth and CORS.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from sd import TINY
from sd.params import GenerationParams
from sd.pipeline import Pipeline
from sd.server import Service, make_server
from sd.testing import random_models

SIZE = dict(width=64, height=64)
BODY_TIMEOUT_S = 1.0
SMALL_LIMIT = 2**20


def start(pipe: Pipeline, **options):
    server = make_server(Service(pipe), "127.0.0.1", 0, body_timeout=BODY_TIMEOUT_S, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, server.server_address[1]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(random_models(TINY), model_name="tiny", model_hash="0123456789")


@pytest.fixture(scope="module")
def served(pipe):
    server, port = start(pipe, max_body=SMALL_LIMIT)
    yield port
    server.shutdown()
    server.server_close()


def post(port: int, path: str, body: object, timeout: float = 120, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"null"), dict(answer.getheaders())
    finally:
        connection.close()


def get(port: int, path: str, headers: dict | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"null"), dict(answer.getheaders())
    finally:
        connection.close()


def idle(port: int, within: float = 30) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        progress = get(port, "/sdapi/v1/progress?skip_current_image=true")[1]
        if progress["state"]["job_count"] == 0 and not progress["queue"]:
            return True
        time.sleep(0.05)
    return False


def wait_running(port: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while get(port, "/sdapi/v1/progress?skip_current_image=true")[1]["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.02)


GOOD = {"prompt": "a red circle", "steps": 2, "seed": 1, **SIZE}


def test_64_concurrent_clients_are_all_answered(served):
    """The stdlib server lost requests to resets at 32 clients; every one of 64 gets its answer now."""

    def one(i: int):
        try:
            status, answer, _ = post(served, "/sdapi/v1/txt2img", {**GOOD, "seed": i}, timeout=300)
            return status, json.loads(answer["info"])["all_seeds"] if status == 200 else answer
        except OSError as error:  # a reset or a refused connection: what must not happen
            return type(error).__name__, str(error)

    started = time.monotonic()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:5]
    assert sorted(seeds[0] for _, seeds in results) == list(range(64))  # each its own answer
    assert time.monotonic() - started < 300
    assert idle(served)


def test_a_client_that_leaves_mid_job_does_not_wedge_the_queue(served):
    slow = json.dumps({"prompt": "slow", "steps": 5000, "sampler_name": "Euler", **SIZE}).encode()
    leaving = socket.create_connection(("127.0.0.1", served), timeout=10)
    leaving.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(slow)}\r\n\r\n".encode() + slow)  # fmt: skip
    wait_running(served)
    # a second client waits behind it, and leaves too
    waiting = socket.create_connection(("127.0.0.1", served), timeout=10)
    waiting.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(slow)}\r\n\r\n".encode() + slow)  # fmt: skip
    deadline = time.monotonic() + 10
    while not get(served, "/sdapi/v1/progress?skip_current_image=true")[1]["queue"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting.close()
    leaving.close()
    assert idle(served, within=20)  # the running job was stopped, the waiting one dropped unrun
    assert post(served, "/sdapi/v1/txt2img", GOOD)[0] == 200


def test_a_truncated_body_and_a_stalled_sender(served):
    # truncated: the client says 1000 bytes, sends 10 and goes away
    with socket.create_connection(("127.0.0.1", served), timeout=10) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\":")  # fmt: skip
    # stalled: the same, but it stays: 408 after BODY_TIMEOUT_S, one line
    with socket.create_connection(("127.0.0.1", served), timeout=10) as sock:
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\":")  # fmt: skip
        started = time.monotonic()
        answer = b""
        while b"}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 408") and "no request body bytes for 1 s" in answer, answer
        assert time.monotonic() - started < BODY_TIMEOUT_S + 5
    assert post(served, "/sdapi/v1/txt2img", GOOD)[0] == 200


def _send_and_read(port: int, head: bytes, chunks) -> bytes:
    """Send a request whose body the server may refuse (answer, and close) before it is all sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while b"}" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def test_oversized_bodies_are_refused(served):
    start = b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    size = SMALL_LIMIT + 65536
    answer = _send_and_read(served, start + f"Content-Length: {size}\r\n\r\n".encode(),
                            (b"x" * 65536 for _ in range(size // 65536)))  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 413") and b"request body over" in answer, answer
    # chunked, no Content-Length: counted while read
    chunks = (b"10000\r\n" + b"a" * 65536 + b"\r\n" for _ in range(SMALL_LIMIT // 65536 + 2))
    answer = _send_and_read(served, start + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 413") and b"request body over" in answer, answer
    assert post(served, "/sdapi/v1/txt2img", GOOD)[0] == 200


def test_garbage_on_the_socket_and_bad_json(served):
    with socket.create_connection(("127.0.0.1", served), timeout=10) as sock:
        sock.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    for body in (b"{nope", b'{"prompt": "a", "steps": NaN}', b'{"prompt": "\xff\xfe"}', b"[]", b'"text"'):
        status, answer, _ = post(served, "/sdapi/v1/txt2img", body)
        assert status in (400, 422) and "\n" not in answer["detail"], (body, answer)
    assert post(served, "/sdapi/v1/txt2img", GOOD)[0] == 200


def test_a_cross_site_form_is_not_read_as_json(served):
    """curl -d (a form type, no Origin) is read as JSON; a browser's cross-site form (Origin) is not."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert post(served, "/sdapi/v1/txt2img", GOOD, headers=form)[0] == 200
    status, _, _ = post(served, "/sdapi/v1/txt2img", GOOD, headers={**form, "Origin": "http://evil.example"})
    assert status == 422


def test_cors_is_off_unless_asked(pipe, served):
    preflight = {"Origin": "http://ui.example", "Access-Control-Request-Method": "POST"}
    _, _, headers = get(served, "/sdapi/v1/options", {"Origin": "http://ui.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}
    server, port = start(pipe, cors_origins=["http://ui.example"])
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("OPTIONS", "/sdapi/v1/txt2img", headers=preflight)
        answer = connection.getresponse()
        answer.read()
        assert answer.status == 200 and answer.getheader("access-control-allow-origin") == "http://ui.example"
        connection.close()
    finally:
        server.shutdown()
        server.server_close()


def test_api_auth(pipe):
    webuiapi = pytest.importorskip("webuiapi")
    server, port = start(pipe, auth={"alice": "s3cret", "bob": "pw:with:colons"})
    try:
        status, answer, headers = get(port, "/sdapi/v1/options")
        assert (
            status == 401 and headers.get("www-authenticate") == "Basic" and "Incorrect" in answer["detail"]
        )
        wrong = "Basic " + base64.b64encode(b"alice:nope").decode()
        assert get(port, "/sdapi/v1/options", {"Authorization": wrong})[0] == 401
        right = "Basic " + base64.b64encode(b"bob:pw:with:colons").decode()
        assert get(port, "/sdapi/v1/options", {"Authorization": right})[0] == 200
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, username="alice", password="s3cret")
        assert api.txt2img(prompt="x", steps=2, seed=3, **SIZE).info["all_seeds"] == [3]
    finally:
        server.shutdown()
        server.server_close()


def _same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def test_webuiapi_as_its_users_call_it(pipe, served):
    """The A1111 client library most scripts use, unchanged: its payloads carry every field with A1111's
    defaults (eta 1.0, sampler_index, script_args [], ...)."""
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(host="127.0.0.1", port=served, sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a blue square", negative_prompt="red", seed=11, cfg_scale=6, **SIZE)
    params = GenerationParams(
        "a blue square", "red", 3, "Euler a", cfg_scale=6.0, seed=11, a1111=True, **SIZE
    )
    expected = expected_txt2img = pipe.run(params)[0]
    assert _same(result.image, expected) and result.info["all_seeds"] == [11]
    assert result.image.info["parameters"] == expected.info["parameters"]
    again = api.img2img(
        images=[result.image], prompt="a green square", seed=2, denoising_strength=0.5, **SIZE
    )
    assert again.info["denoising_strength"] == 0.5 and again.image.size == (64, 64)
    assert "Denoising strength: 0.5" in again.image.info["parameters"]
    assert api.png_info(result.image).info == expected.info["parameters"]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 32))
    inpainted = api.img2img(images=[result.image], mask_image=mask, prompt="a hole", seed=5, mask_blur=0,
                            inpainting_fill=1, inpaint_full_res=False, denoising_strength=0.9,
                            **SIZE)  # fmt: skip
    expected = pipe.inpaint(result.image, mask, "a hole", steps=3, sampler="Euler a", seed=5, strength=0.9,
                            cfg_scale=7.0, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                            a1111=True, **SIZE)[0]  # fmt: skip
    assert _same(inpainted.image, expected) and "Mask blur" not in inpainted.image.info["parameters"]
    outside = np.asarray(mask) == 0  # no blur: pixels outside the mask stay the input's
    source = np.asarray(result.image.convert("RGB"))
    assert np.array_equal(np.asarray(inpainted.image)[outside], source[outside])
    upscaled = api.extra_single_image(result.image, upscaler_1=webuiapi.Upscaler.Lanczos, upscaling_resize=2)
    assert upscaled.image.size == (128, 128) and upscaled.info.startswith("<p>Postprocess upscale by: 2")
    assert upscaled.image.info["parameters"] == expected_txt2img.info["parameters"]
    assert "DPM++ 2M" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    assert api.util_get_current_model() == "tiny [0123456789]"
    assert api.util_get_model_names() == ["tiny [0123456789]"]
    api.set_options({"CLIP_stop_at_last_layers": 2})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 2
    api.set_options({"CLIP_stop_at_last_layers": 1})
    for call in (api.get_sd_vae, api.get_loras, api.get_upscalers, api.get_latent_upscale_modes,
                 api.get_prompt_styles, api.get_embeddings, api.get_memory, api.get_cmd_flags,
                 api.get_scripts, api.refresh_checkpoints, api.interrupt, api.skip):  # fmt: skip
        call()
    api.util_wait_for_ready(check_interval=0.1)
    with pytest.raises(RuntimeError) as error:  # a bad request: webuiapi's error, the server's one line
        api.txt2img(prompt="x", sampler_name="nope", **SIZE)
    assert error.value.args[0] == 400 and "unknown sampler 'nope'" in error.value.args[1]
