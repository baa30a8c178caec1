"""The web UI at `/`, used in a real browser: headless Chromium against `sd serve` with the built-in model.

Selenium drives Debian's `chromium` through Debian's `chromium-driver`: the two come from one source
package, so the driver always speaks the browser's protocol version (Playwright is built against its own
Chromium and would need that downloaded). Without them (or selenium) every test here skips, saying so;
`.ci/run` installs them. The server is the real CLI (`python -m sd serve`), on 127.0.0.1 and a free port,
with an empty model folder: the built-in shapes model, one embedding and one LoRA file in it.

The screenshot after a generation goes to $SD_WEBUI_SCREENSHOT, the one after an inpainting (the mask
painted, its result shown) to $SD_WEBUI_INPAINT_SCREENSHOT (default for both: the test's tmp folder).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from sd.webui import token_count

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Flags for a closed network (no update, sync or QUIC probes flooding refused connections) and a root
# user in a container (no sandbox).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1000",
)  # fmt: skip
EMBEDDING = "shinyball"  # 2 vectors: counts as 2 tokens, where its name's BPE would count 3
LORA = "ink-style"
SERVER_START_S = 180  # imports and the model load, on a busy 2-core machine
GENERATION_S = 120


def need_chromium() -> None:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no Chromium: `apt-get install chromium chromium-driver` (.ci/run installs them)")


# --- the server and the browser ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: Any = None, timeout: float = GENERATION_S) -> tuple[int, str, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.headers.get("Content-Type", ""), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def model_folder(home: Path) -> None:
    """An embedding (as wide as the built-in model's text encoder, 64) and a LoRA file, in A1111's layout."""
    models = home / "models"
    (models / "embeddings").mkdir(parents=True)
    (models / "Lora").mkdir()
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(0))},
              models / "embeddings" / f"{EMBEDDING}.safetensors")  # fmt: skip
    # A LoRA for the built-in U-Net's first attention (kohya names); listed, inserted, never applied here.
    lora = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
    }
    save_file(lora, models / "Lora" / f"{LORA}.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    need_chromium()  # no server to start for tests that will not run
    home = tmp_path_factory.mktemp("sd-home")
    model_folder(home)
    env = {k: v for k, v in os.environ.items() if k not in ("SD_CHECKPOINT", "XDG_DATA_HOME")}
    env |= {"SD_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    port = free_port()
    log = (home / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "sd", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"sd serve exited ({process.returncode}):\n{(home / 'server.log').read_text()}")
            try:
                status, kind, _ = http(url + "/", timeout=5)
                if status == 200 and "text/html" in kind:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log_text = (home / "server.log").read_text()
                pytest.fail(f"sd serve gave no page at / in {SERVER_START_S} s:\n{log_text}")
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGINT)  # as Ctrl-C: the server's own clean stop
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    need_chromium()
    webdriver = pytest.importorskip("selenium.webdriver", reason="no selenium (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="sd-webui-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(GENERATION_S)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(server: str, browser: Any) -> Any:
    """The UI, freshly loaded, with the server's choices in its pickers."""
    browser.get(server + "/")
    wait(browser, lambda: js(browser, "return document.getElementById('sampler_name').options.length") > 1)
    wait(browser, lambda: js(browser, "return document.getElementById('lora_count').textContent") != "0")
    return browser


# --- helpers -----------------------------------------------------------------------------------------------


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def wait(driver: Any, condition: Callable[[], Any], timeout: float = GENERATION_S) -> Any:
    """condition()'s first truthy value; on timeout a failure that shows the page's status and console."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            status = js(driver, "return document.getElementById('status').textContent")
            console = [entry["message"] for entry in driver.get_log("browser")]
            pytest.fail(f"timed out after {timeout} s; page status {status!r}; console {console}")
        time.sleep(0.05)


def element(driver: Any, css: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def type_into(driver: Any, css: str, text: str) -> None:
    """Replace a field's value by typing, as a person does (select all, type, tab away)."""
    from selenium.webdriver.common.keys import Keys

    box = element(driver, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE, text, Keys.TAB)


def value(driver: Any, field: str) -> str:
    return js(driver, "return document.getElementById(arguments[0]).value", field)


def tokens_label(driver: Any, label: str) -> str:
    return element(driver, f"#{label}").text


def gallery_count(driver: Any) -> int:
    return js(driver, "return document.querySelectorAll('#gallery img').length")


def failed(driver: Any) -> bool:
    return "error" in element(driver, "#status").get_attribute("class")


def seen_fractions(driver: Any) -> list[float]:
    """The progress fractions the page polled during the latest job (it records them for us)."""
    return [float(f) for f in (element(driver, "#progress").get_attribute("data-seen") or "").split()]


def png_of(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    return Image.open(io.BytesIO(base64.b64decode(data_url.partition(",")[2])))


def generate_and_watch(driver: Any) -> tuple[list[float], int]:
    """Click Generate and wait for the gallery to grow: the progress fractions polled meanwhile (the page
    records them) and how many live previews it showed."""
    before = gallery_count(driver)
    element(driver, "#generate").click()
    wait(driver, lambda: gallery_count(driver) > before or failed(driver))
    assert gallery_count(driver) > before, element(driver, "#status").text
    return seen_fractions(driver), int(element(driver, "#progress").get_attribute("data-previews") or 0)


def paint(driver: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    """A stroke on the mask canvas with real pointer input, from `start` to `end` (fractions of the
    canvas's width and height, as shown): press, drag, release."""
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = element(driver, "#mask_canvas")
    width, height = canvas.size["width"], canvas.size["height"]
    # Selenium's offsets are from the element's centre.
    x0, y0 = (start[0] - 0.5) * width, (start[1] - 0.5) * height
    dx, dy = (end[0] - start[0]) * width, (end[1] - start[1]) * height
    actions = ActionChains(driver).move_to_element_with_offset(canvas, round(x0), round(y0)).click_and_hold()
    for _ in range(4):  # a few moves, as a hand makes: each draws a segment
        actions.move_by_offset(round(dx / 4), round(dy / 4))
    actions.release().perform()


def mask_call(driver: Any, function: str) -> Any:
    """mask.js's `function`() in the page's own module (the one app.js imported)."""
    script = """
        const done = arguments[arguments.length - 1];
        import('./static/mask.js').then((mask) => done(mask[arguments[0]]()));
    """
    return driver.execute_async_script(script, function)


def exported_mask(driver: Any) -> np.ndarray:
    """The mask the page would send, as grey levels (exportMask's PNG)."""
    return np.asarray(png_of(mask_call(driver, "exportMask")).convert("L"))


def start_inpainting(driver: Any, init: Path) -> None:
    """img2img with `init` as its input, and Paint mask turned on."""
    element(driver, '[data-tab="img2img"]').click()
    element(driver, "#init_file").send_keys(str(init))
    wait(driver, lambda: element(driver, "#mask_panel").is_displayed(), timeout=10)
    element(driver, "#paint_mask").click()
    assert element(driver, "#mask_canvas").is_displayed() and element(driver, "#mask_blur").is_displayed()


def drop_file(driver: Any, path: Path, target_css: str = "body") -> None:
    """Drop a file on an element as a person drags one from the desktop: the file goes through a real
    file input (selenium's way to hand a browser a file), then a drop event carries it."""
    js(driver, "const i = document.createElement('input'); i.type = 'file'; i.id = 'test_file';"
               "i.style.display = 'none'; document.body.append(i);")  # fmt: skip
    element(driver, "#test_file").send_keys(str(path))
    js(driver, """
        const input = document.getElementById('test_file');
        const target = document.querySelector(arguments[0]);
        const data = new DataTransfer();
        data.items.add(input.files[0]);
        for (const type of ['dragenter', 'dragover', 'drop']) {
          target.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true}));
        }
        input.remove();
    """, target_css)  # fmt: skip


# --- the token count, without a browser --------------------------------------------------------------------


def test_token_count_is_a1111s() -> None:
    # README's `sd prompt` example: BREAK starts a second chunk, the LoRA tag is not counted.
    readme = "masterpiece, (detailed face:1.2), [blurry], a castle BREAK night sky <lora:ink:0.8>"
    assert token_count(readme) == (77, 150)
    assert token_count("") == (0, 75)
    assert token_count("a cat") == (2, 75)
    # AND parts and prompt-editing variants are counted apart, the longest shown (positive prompt only).
    assert token_count("a cat AND a very big red dog") == (5, 75)
    assert token_count("a cat AND a very big red dog", negative=True) == (8, 75)
    assert token_count("a [cat:big red dog:10]", steps=20) == (4, 75)
    assert token_count(", ".join(["word"] * 40)) == (79, 150)


def test_the_ui_routes() -> None:
    """POST /sd/tokens and GET /sd/model, through FastAPI as the server includes them."""
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from sd import TINY
    from sd.pipeline import Pipeline
    from sd.testing import random_models
    from sd.webui import router

    pipe = Pipeline(random_models(TINY), model_name="tiny")
    app = fastapi.FastAPI()
    app.include_router(router(lambda: pipe))
    client = TestClient(app)
    answer = client.post("/sd/tokens", json={"text": "a cat AND a dog, sitting", "steps": 20})
    assert answer.status_code == 200 and answer.json() == {"token_count": 4, "max_length": 75}
    assert client.post("/sd/tokens", json={"text": "x" * 200_000}).status_code == 422
    assert client.post("/sd/tokens", json={"text": "a", "steps": 0}).status_code == 422
    assert client.get("/sd/model").json() == {"native_size": pipe.native_size, "model_name": "tiny"}


def test_the_page_loads_only_its_own_files() -> None:
    """index.html loads static/<file>, the modules import their siblings, and nothing comes from elsewhere
    (no CDN: the page works on a machine without internet)."""
    from sd.webui import INDEX_HTML, STATIC_DIR

    names = {path.name for path in STATIC_DIR.iterdir()}
    page = INDEX_HTML.read_text()
    loaded = set(re.findall(r'(?:src|href)="static/([\w.]+)"', page))
    sources = {name: (STATIC_DIR / name).read_text() for name in names}
    imported = {i for text in sources.values() for i in re.findall(r'from "\./([\w.]+)"', text)}
    assert {"app.js", "style.css"} <= loaded and loaded | imported <= names
    for name, text in sources.items():
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name


# --- the tests in the browser ------------------------------------------------------------------------------


def test_the_page_offers_what_the_server_has(page: Any) -> None:
    samplers = js(page, "return [...document.getElementById('sampler_name').options].map(o => o.value)")
    assert {"DPM++ 2M", "Euler a", "DDIM", "UniPC"} <= set(samplers)
    assert value(page, "sampler_name") == "DPM++ 2M" and value(page, "scheduler") == "Automatic"
    schedules = js(page, "return [...document.getElementById('scheduler').options].map(o => o.value)")
    assert {"Automatic", "Karras", "Exponential"} <= set(schedules)
    assert "shapes-builtin" in value(page, "checkpoint")
    # The built-in model's own size, not A1111's 512 (which it was not trained for).
    assert value(page, "width") == value(page, "height") == "64"
    assert value(page, "steps") == "20" and value(page, "cfg_scale") == "7" and value(page, "seed") == "-1"
    assert element(page, "#img2img_panel").is_displayed() is False
    # No script error while loading (a module that fails to load or throws is logged here).
    logged = page.get_log("browser")
    assert [e["message"] for e in logged if e["level"] == "SEVERE" and e["source"] != "network"] == []


def test_token_counter_counts_as_a1111(page: Any) -> None:
    prompt = "a red circle on a blue background, (masterpiece:1.2), <lora:ink-style:0.8>"
    element(page, "#prompt").send_keys(prompt)
    expected = "{}/{}".format(*token_count(prompt))
    wait(page, lambda: tokens_label(page, "prompt_tokens") == expected, timeout=10)
    # Past 75 tokens a second chunk: A1111's "/150".
    element(page, "#prompt").send_keys(", very" * 40)
    count, capacity = token_count(prompt + ", very" * 40)
    assert capacity == 150
    wait(page, lambda: tokens_label(page, "prompt_tokens") == f"{count}/150", timeout=10)
    # The negative prompt has its own; an embedding counts its vectors (2), not its name's BPE tokens.
    element(page, "#negative_prompt").send_keys(f"blurry {EMBEDDING}")
    wait(page, lambda: tokens_label(page, "negative_tokens") == "3/75", timeout=10)


def test_networks_insert_lora_tags_and_embeddings(page: Any) -> None:
    element(page, "#networks summary").click()
    element(page, "#prompt").send_keys("a square")
    element(page, f'#lora_list button[data-insert="<lora:{LORA}:1>"]').click()
    assert value(page, "prompt") == f"a square, <lora:{LORA}:1>"
    element(page, "#negative_prompt").click()
    element(page, f'#embedding_list button[data-insert="{EMBEDDING}"]').click()
    assert value(page, "negative_prompt") == EMBEDDING  # into the prompt box typed in last


def test_generate_shows_progress_previews_and_the_image(page: Any, tmp_path: Path) -> None:
    element(page, "#prompt").send_keys("a red circle on a blue background")
    element(page, "#negative_prompt").send_keys("green")
    # Enough work that the page polls /progress mid-job (the built-in model is fast at 64 px).
    type_into(page, '[data-mirror="steps"]', "30")
    type_into(page, '[data-mirror="width"]', "256")
    type_into(page, '[data-mirror="height"]', "192")
    type_into(page, "#seed", "4242")
    seen, previews = generate_and_watch(page)
    assert any(0 < f < 1 for f in seen), f"the progress bar never moved: {seen}"
    assert previews >= 1, "no live preview shown during sampling"
    # The image shown is the gallery's first, a PNG that carries its parameters; the download is the same.
    shown = js(page, "return document.getElementById('viewer').src")
    image = png_of(shown)
    assert image.size == (256, 192)
    parameters = image.info["parameters"]
    assert parameters.startswith("a red circle on a blue background\nNegative prompt: green\n")
    for part in ("Steps: 30", "Sampler: DPM++ 2M", "Seed: 4242", "Size: 256x192", "Model: shapes-builtin"):
        assert part in parameters
    assert element(page, "#download").get_attribute("href") == shown
    assert element(page, "#download").get_attribute("download").endswith("-4242.png")
    assert "Seed: 4242" in element(page, "#infotext").text
    # Recycle gives the shown image's seed back; the dice makes it random again.
    type_into(page, "#seed", "1")
    element(page, "#reuse_seed").click()
    assert value(page, "seed") == "4242"
    element(page, "#random_seed").click()
    assert value(page, "seed") == "-1"
    screenshot = Path(os.environ.get("SD_WEBUI_SCREENSHOT") or tmp_path / "webui.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert page.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000


def test_dropping_a_png_restores_its_settings(server: str, page: Any, tmp_path: Path) -> None:
    # A PNG the server made, with settings far from the form's defaults.
    request = {
        "prompt": "a blue square, [red:green:0.5]", "negative_prompt": "noise", "steps": 7,
        "sampler_name": "Euler a", "scheduler": "Exponential", "cfg_scale": 4.5, "seed": 1234,
        "width": 128, "height": 64, "subseed": 99, "subseed_strength": 0.25,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337},
    }  # fmt: skip
    status, _, body = http(server + "/sdapi/v1/txt2img", request)
    assert status == 200, body[:300]
    answer = json.loads(body)
    path = tmp_path / "made.png"
    path.write_bytes(base64.b64decode(answer["images"][0]))
    made = Image.open(path)
    assert "ENSD: 31337" in made.info["parameters"] and "Clip skip: 2" in made.info["parameters"]

    drop_file(page, path)
    wait(page, lambda: "restored" in element(page, "#status").text, timeout=30)
    restored = {f: value(page, f) for f in ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler",
                                           "cfg_scale", "seed", "width", "height", "clip_skip", "subseed",
                                           "subseed_strength")}  # fmt: skip
    assert restored == {
        "prompt": "a blue square, [red:green:0.5]", "negative_prompt": "noise", "steps": "7",
        "sampler_name": "Euler a", "scheduler": "Exponential", "cfg_scale": "4.5", "seed": "1234",
        "width": "128", "height": "64", "clip_skip": "2", "subseed": "99", "subseed_strength": "0.25",
    }  # fmt: skip
    assert js(page, "return document.getElementById('extra').checked")
    assert "ENSD: 31337" in element(page, "#overrides").text  # A1111's override settings, sent along
    # Generating from the restored form makes the very same image.
    generate_and_watch(page)
    again = png_of(js(page, "return document.getElementById('viewer').src"))
    assert again.info["parameters"] == made.info["parameters"]
    assert again.convert("RGB").tobytes() == made.convert("RGB").tobytes()


def test_read_parameters_from_a_pasted_infotext(page: Any) -> None:
    """A1111's ↙ button: an infotext pasted into the prompt box (copied from a web page) fills the form."""
    infotext = (
        "a lighthouse, (oil painting:1.2)\nNegative prompt: blurry, lowres\n"
        'Steps: 33, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 77, Size: 128x96, Lora hashes: "ink: 01",'
        " Version: v1.6.0, ENSD: 31337, Hires upscale: 2, Face restoration: CodeFormer"
    )
    js(page, "const box = document.getElementById('prompt'); box.value = arguments[0];", infotext)
    element(page, "#read_parameters").click()
    wait(page, lambda: "restored" in element(page, "#status").text, timeout=10)
    fields = ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed", "width")
    assert {f: value(page, f) for f in (*fields, "height")} == {
        "prompt": "a lighthouse, (oil painting:1.2)", "negative_prompt": "blurry, lowres", "steps": "33",
        "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": "6.5", "seed": "77", "width": "128",
        "height": "96",
    }  # fmt: skip
    assert "ENSD: 31337" in element(page, "#overrides").text
    assert js(page, "return document.getElementById('enable_hr').checked") and value(page, "hr_scale") == "2"
    assert element(page, "#restore_note").text == "not restored: Face restoration"


def test_restore_reads_old_a1111_names(page: Any) -> None:
    """infotext.js's rules for PNGs of older A1111s, as sd.params.GenerationParams.from_text reads them."""
    script = """
        const done = arguments[arguments.length - 1];
        import('./static/infotext.js').then(({settingsFrom}) => done(arguments[0].map(
            (p) => settingsFrom(p, {samplerNames: ['DPM++ 2M', 'Euler a'], scheduleLabels: ['Karras']}))));
    """
    cases = [
        {"Sampler": "DPM++ 2M Karras", "Version": "v1.6.0"},  # before v1.9 the name held the schedule
        {"Sampler": "Euler a", "Version": "v1.8.0"},  # and a plain name meant the sampler's own: Uniform
        {"Sampler": "Euler a"},  # no Version (not A1111's own file): the same
        {"Sampler": "Euler a", "Version": "v1.10.1"},  # from v1.9 a missing schedule is Automatic
        {"Sampler": "dpmpp_2m", "Schedule type": "Karras", "Sampling": "diffusers", "RNG": "CPU", "ENSD": 7},
    ]
    got = page.execute_async_script(script, cases)
    picked = [(g["fields"]["sampler_name"], g["fields"]["scheduler"]) for g in got]
    assert picked == [("DPM++ 2M", "Karras"), ("Euler a", "Uniform"), ("Euler a", "Uniform"),
                      ("Euler a", "Automatic"), ("dpmpp_2m", "Karras")]  # fmt: skip
    assert got[4]["way"] == "diffusers" and got[0]["way"] is None
    assert got[4]["overrides"] == {
        "randn_source": {"key": "RNG", "value": "CPU"},
        "eta_noise_seed_delta": {"key": "ENSD", "value": 7},
    }
    assert got[0]["fields"]["clip_skip"] == 1 and got[0]["unrestored"] == []


def test_img2img_with_an_uploaded_init_image(page: Any, tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    element(page, '[data-tab="img2img"]').click()
    assert element(page, "#img2img_panel").is_displayed()
    element(page, "#init_file").send_keys(str(init))  # what choosing a file in the dialog does
    wait(page, lambda: element(page, "#init_preview").is_displayed(), timeout=10)
    element(page, "#prompt").send_keys("a red square")
    type_into(page, '[data-mirror="denoising_strength"]', "0.6")
    type_into(page, '[data-mirror="steps"]', "5")
    generate_and_watch(page)
    image = png_of(js(page, "return document.getElementById('viewer').src"))
    assert image.size == (64, 64) and "Denoising strength: 0.6" in image.info["parameters"]
    # A PNG dropped on the init-image box is the new input, not settings to restore.
    drop_file(page, init, "#init_zone")
    assert value(page, "prompt") == "a red square"


def test_painting_the_inpainting_mask(page: Any, tmp_path: Path) -> None:
    """The mask is painted over the init image at the image's own size; eraser, Undo, Clear and an
    uploaded mask change it; Paint mask on with nothing painted sends nothing and says why."""
    init = tmp_path / "init.png"
    Image.new("RGB", (96, 64), (30, 120, 200)).save(init)
    start_inpainting(page, init)
    box = element(page, "#mask_canvas").size
    assert abs(box["width"] / box["height"] - 96 / 64) < 0.02  # the image's aspect ratio
    assert mask_call(page, "hasMask") is False
    type_into(page, '[data-mirror="brush_size"]', "40")
    paint(page, (0.25, 0.5), (0.75, 0.5))  # along the middle row, x 24..72
    assert mask_call(page, "hasMask") is True
    mask = exported_mask(page)
    assert mask.shape == (64, 96)
    assert (mask[32, 26:71] == 255).all(), mask[32]
    assert mask[:20].max() == 0 and mask[45:].max() == 0 and mask[:, :16].max() == 0
    # The eraser takes the stroke's right half away; Undo brings it back, then takes the stroke away.
    element(page, 'input[name="mask_tool"][value="eraser"]').click()
    paint(page, (0.5, 0.3), (0.9, 0.7))
    paint(page, (0.5, 0.7), (0.9, 0.3))
    paint(page, (0.55, 0.5), (0.9, 0.5))
    assert exported_mask(page)[32, 60] == 0 and exported_mask(page)[32, 30] == 255
    for _ in range(3):
        element(page, "#mask_undo").click()
    assert exported_mask(page)[32, 60] == 255
    element(page, "#mask_undo").click()
    assert mask_call(page, "hasMask") is False and exported_mask(page).max() == 0
    # Generating now would send an empty mask: the page says so instead.
    element(page, "#generate").click()
    assert failed(page) and "nothing is painted" in element(page, "#status").text
    assert gallery_count(page) == 0
    # An uploaded black/white mask, stretched to the init image; Clear empties it.
    upload = tmp_path / "mask.png"
    half = Image.new("L", (48, 32), 0)
    half.paste(255, (0, 0, 24, 32))
    half.save(upload)
    element(page, "#mask_file").send_keys(str(upload))
    wait(page, lambda: mask_call(page, "hasMask"), timeout=10)
    mask = exported_mask(page)
    assert mask.shape == (64, 96) and mask[:, :46].min() == 255 and mask[:, 50:].max() == 0
    element(page, "#mask_clear").click()
    assert mask_call(page, "hasMask") is False


def test_inpainting_from_the_page(page: Any, tmp_path: Path) -> None:
    """A painted mask and A1111's inpaint controls go with the img2img request: the server repaints under
    the mask and keeps the init image's pixels elsewhere (mask blur 0: exactly)."""
    init = tmp_path / "init.png"
    picture = Image.new("RGB", (64, 64), (40, 90, 200))
    ImageDraw.Draw(picture).ellipse((12, 12, 52, 52), fill=(240, 200, 40))
    picture.save(init)
    start_inpainting(page, init)
    type_into(page, '[data-mirror="brush_size"]', "60")
    paint(page, (0.2, 0.45), (0.8, 0.55))
    type_into(page, '[data-mirror="mask_blur"]', "0")
    element(page, 'input[name="inpainting_fill"][value="2"]').click()  # latent noise
    element(page, "#prompt").send_keys("a red square")
    type_into(page, '[data-mirror="denoising_strength"]', "0.9")
    type_into(page, '[data-mirror="steps"]', "6")
    type_into(page, "#seed", "11")
    generate_and_watch(page)
    image = png_of(js(page, "return document.getElementById('viewer').src"))
    assert image.size == (64, 64) and "Masked content: latent noise" in image.info["parameters"]
    assert "Inpaint area" not in image.info["parameters"]  # the page's "Whole picture", not the API's default
    mask = exported_mask(page)
    got, source = np.asarray(image.convert("RGB")).astype(int), np.asarray(picture).astype(int)
    assert (mask == 0).sum() > 1000 and (mask == 255).sum() > 300
    assert np.array_equal(got[mask == 0], source[mask == 0])  # A1111's composite: unmasked pixels kept
    assert np.abs(got[mask == 255] - source[mask == 255]).mean() > 10  # repainted
    # Its settings come back from its PNG (no "Mask blur": A1111 writes it only when > 0).
    type_into(page, '[data-mirror="mask_blur"]', "4")
    element(page, 'input[name="inpainting_fill"][value="1"]').click()
    element(page, "#restore_shown").click()
    wait(page, lambda: "restored" in element(page, "#status").text, timeout=30)
    assert value(page, "mask_blur") == "0"
    assert js(page, "return document.querySelector('[name=inpainting_fill]:checked').value") == "2"
    screenshot = Path(os.environ.get("SD_WEBUI_INPAINT_SCREENSHOT") or tmp_path / "webui-inpaint.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    js(page, "document.getElementById('form').scrollIntoView()")  # the prompt, the mask and the result
    assert page.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000


def test_restore_reads_inpaint_settings(page: Any) -> None:
    """The keys A1111 (and sd.inpaint) write for an inpainting restore its controls; absent ones are
    A1111's UI defaults once any is there, and a PNG without them leaves the controls alone."""
    script = """
        const done = arguments[arguments.length - 1];
        import('./static/infotext.js').then(({settingsFrom}) => done(arguments[0].map(settingsFrom)));
    """
    cases = [
        {"Mask blur": "8", "Mask mode": "Inpaint not masked", "Inpaint area": "Only masked",
         "Masked area padding": "48", "Masked content": "latent noise", "Conditional mask weight": "0.5"},
        {"Mask blur": "4"},
        {"Mask blur x": "2", "Mask blur y": "0"},
        {"Steps": "20"},
    ]  # fmt: skip
    got = page.execute_async_script(script, cases)
    keys = ("mask_blur", "inpainting_mask_invert", "inpainting_fill", "inpaint_full_res",
            "inpaint_full_res_padding")  # fmt: skip
    assert [tuple(g["fields"].get(k) for k in keys) for g in got] == [
        (8, 1, 2, 1, 48), (4, 0, 1, 0, 32), (2, 0, 1, 0, 32), (None,) * 5,
    ]  # fmt: skip
    assert got[0]["overrides"] == {"inpainting_mask_weight": {"key": "Conditional mask weight", "value": 0.5}}
    assert got[0]["unrestored"] == got[1]["unrestored"] == [] and got[2]["unrestored"] == ["Mask blur y"]


def test_hires_fix(page: Any, tmp_path: Path) -> None:
    """A second pass at twice the size; its PNG says so, and dropping it turns the hires fix back on."""
    element(page, "#prompt").send_keys("a green triangle")
    element(page, "#enable_hr").click()
    assert element(page, "#hires_fields").is_displayed()
    js(page, "const s = document.getElementById('hr_upscaler'); s.value = 'Lanczos';")
    type_into(page, '[data-mirror="steps"]', "4")
    type_into(page, '[data-mirror="hr_second_pass_steps"]', "3")
    type_into(page, '[data-mirror="hr_denoising_strength"]', "0.45")
    generate_and_watch(page)
    image = png_of(js(page, "return document.getElementById('viewer').src"))
    assert image.size == (128, 128)
    for part in ("Size: 64x64", "Denoising strength: 0.45", "Hires upscale: 2", "Hires steps: 3",
                 "Hires upscaler: Lanczos"):  # fmt: skip
        assert part in image.info["parameters"], image.info["parameters"]
    path = tmp_path / "hires.png"
    image.save(path, pnginfo=_text_chunk(image.info["parameters"]))
    page.refresh()
    wait(page, lambda: js(page, "return document.getElementById('hr_upscaler').options.length") > 1)
    drop_file(page, path)
    wait(page, lambda: "restored" in element(page, "#status").text, timeout=30)
    assert js(page, "return document.getElementById('enable_hr').checked")
    hires = ("hr_upscaler", "hr_second_pass_steps", "hr_denoising_strength", "hr_scale", "width")
    assert {f: value(page, f) for f in hires} == {
        "hr_upscaler": "Lanczos", "hr_second_pass_steps": "3", "hr_denoising_strength": "0.45",
        "hr_scale": "2", "width": "64",
    }  # fmt: skip
    element(page, '[data-tab="img2img"]').click()
    assert not element(page, "#hires_panel").is_displayed()  # A1111's hires fix is txt2img's


def _text_chunk(text: str) -> Any:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def test_interrupt_stops_a_long_generation(page: Any) -> None:
    element(page, "#prompt").send_keys("a long one")
    type_into(page, '[data-mirror="steps"]', "150")
    type_into(page, '[data-mirror="width"]', "512")
    type_into(page, '[data-mirror="height"]', "512")
    element(page, "#generate").click()
    wait(page, lambda: any(0 < f < 1 for f in seen_fractions(page)))
    started = time.monotonic()
    element(page, "#interrupt").click()
    wait(page, lambda: element(page, "#generate").is_enabled(), timeout=60)
    assert time.monotonic() - started < 30  # 150 steps at 512 px would take minutes
    # A1111 answers an interrupted job with what it has: an image in the gallery.
    assert gallery_count(page) == 1, element(page, "#status").text
