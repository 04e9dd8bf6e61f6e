"""The web playground in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python API):
type a prompt, press Generate, see the streamed text. The screenshot is kept as a test artifact."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx2 as httpx
import pytest

from glmlab.runs import load_run
from glmlab.serve.app import create_app
from tests.serve.conftest import OPTIONS, LiveServer

ARTIFACTS = Path(os.environ.get("GLMLAB_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_the_page_and_its_files_are_served_without_a_key(make_server):
    server = make_server(api_key="sesame")
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "glmlab playground" in page.text
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{server.url}/static/{name}").status_code == 200
    assert "http" not in httpx.get(server.url + "/static/app.js").text.replace("https://", "")  # no CDN


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Playwright (skips, saying why, when either is missing)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.mark.slow
def test_type_a_prompt_press_generate_see_streamed_text(trained_run, serve_threads, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "playground.png"
    with LiveServer(create_app(load_run(trained_run), OPTIONS)) as server:
        page = browser.new_page(viewport={"width": 1180, "height": 760})
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('card-fields').textContent.includes('gpt')")
        page.fill("#prompt", "First Citizen:")
        page.fill("#max-tokens", "120")
        page.fill("#seed", "1")
        page.click("#generate")
        page.wait_for_selector("#stats[data-done=true]", timeout=60_000)
        text = page.inner_text("#output-text")
        stats = page.inner_text("#stats")
        page.screenshot(path=str(shot), full_page=True)
        page.close()
        same = httpx.post(server.url + "/v1/completions", json={"prompt": "First Citizen:", "max_tokens": 120,
                                                                "seed": 1, "temperature": 0.8, "top_p": 1,
                                                                "top_k": 0}, timeout=60).json()
    assert text == same["choices"][0]["text"] and len(text) > 20  # the page shows what the API gives
    assert "tokens/s" in stats and "finish: " in stats
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_a_vae_run_gets_an_interpolation_view(vae_run, serve_threads, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with LiveServer(create_app(load_run(vae_run), OPTIONS)) as server:
        page = browser.new_page(viewport={"width": 1180, "height": 900})
        page.goto(server.url + "/")
        page.wait_for_selector("#vae:not([hidden])")
        page.fill("#vae-start", "the king is dead")
        page.fill("#vae-end", "i love you")
        page.fill("#vae-steps", "4")
        page.click("#interpolate")
        page.wait_for_function("document.querySelectorAll('#interpolation li').length === 4")
        shown = page.locator("#interpolation li").all_inner_texts()
        page.screenshot(path=str(ARTIFACTS / "playground-vae.png"), full_page=True)
        page.fill("#seed", "3")
        page.click("#vae-sample")
        page.wait_for_function("document.querySelectorAll('#interpolation li').length === 5")
        sampled = page.locator("#interpolation li").all_inner_texts()
        page.close()
        prior = httpx.post(server.url + "/v1/vae/sample", json={"n": 5, "seed": 3, "temperature": 0.8}).json()
        same = httpx.post(server.url + "/v1/vae/interpolate", json={"start": "the king is dead", "end": "i love you",
                                                                    "steps": 4}).json()["sentences"]
    assert shown == [s.strip() for s in same]
    assert sampled == [s.strip() for s in prior["samples"]]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["glm", "bert"])
def test_a_run_that_infills_gets_a_suffix_box(infill_runs, live, serve_threads, browser, family):
    """Fill in the middle from the page: the suffix box shows for a run that can infill, the page sends it, and
    shows the text the API gives between the prompt and the suffix; a run that cannot infill shows no box."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    prompt, suffix = "First Citizen:\nBefore", " hear me"
    with LiveServer(create_app(load_run(infill_runs[family]), OPTIONS)) as server:
        page = browser.new_page(viewport={"width": 1180, "height": 760})
        page.goto(server.url + "/")
        page.wait_for_selector("#infill:not([hidden])")
        page.fill("#prompt", prompt)
        page.fill("#suffix", suffix)
        page.fill("#max-tokens", "20")
        page.fill("#seed", "1")
        page.click("#generate")
        page.wait_for_selector("#stats[data-done=true]", timeout=60_000)
        text, shown_suffix = page.text_content("#output-text"), page.text_content("#output-suffix")
        page.screenshot(path=str(ARTIFACTS / f"playground-infill-{family}.png"), full_page=True)
        page.close()
        same = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "suffix": suffix, "max_tokens": 20,
                                                                "seed": 1, "temperature": 0.8, "top_p": 1,
                                                                "top_k": 0}, timeout=60).json()
    assert text == same["choices"][0]["text"] and len(text) > 3 and shown_suffix == suffix
    page = browser.new_page()
    page.goto(live.url + "/")
    page.wait_for_function("document.getElementById('card-fields').textContent.includes('gpt')")
    assert page.locator("#infill").is_hidden()
    page.close()
