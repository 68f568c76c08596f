"""The web page in a real headless browser (Debian's chromium and chromedriver, with selenium):
real digits dropped and picked, their labels read off the page, a screenshot saved."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from batchery.local import GatewayProcess, RedisServer, WorkerProcess
from gateway.apikeys import new_key
from tests.factories import digit_paths, label_of

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromium-driver are needed: apt-get install chromium "
                    "chromium-driver (make test and .ci/run do it)")  # fmt: skip
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1000,900"):  # fmt: skip
        options.add_argument(arg)
    # The driver is given: selenium must not try to download one (nothing can be reached).
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(redis_server: RedisServer, worker: WorkerProcess) -> Iterator[GatewayProcess]:
    with GatewayProcess(redis_server.url) as proc:
        yield proc


def drop(driver: WebDriver, paths: list[Path]) -> None:
    """Drop files on the drop zone as a person's drag and drop does: a ``drop`` event whose
    DataTransfer holds the files."""
    files = [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in paths]
    driver.execute_script(
        """
        const transfer = new DataTransfer();
        for (const f of arguments[0]) {
          const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
          transfer.items.add(new File([bytes], f.name, {type: "image/png"}));
        }
        const zone = document.getElementById("drop");
        zone.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true}));
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
        """,
        files,
    )


def answers(driver: WebDriver, expected: int, timeout: float = 60) -> dict[str, str]:
    """File name -> label shown, once ``expected`` cards are answered."""
    deadline = time.monotonic() + timeout
    while True:
        cards = driver.find_elements(By.CSS_SELECTOR, "li.job")
        done = [c for c in cards if c.get_attribute("data-status") == "SUCCESS"]
        if len(done) >= expected:
            return {c.get_attribute("data-file") or "": c.find_element(By.CLASS_NAME, "label").text
                    for c in done}  # fmt: skip
        failed = [c.text for c in cards if c.get_attribute("data-status") in
                  ("FAILURE", "REFUSED")]  # fmt: skip
        assert not failed, failed
        assert time.monotonic() < deadline, f"{len(done)} of {expected} answered"
        time.sleep(0.2)


def test_dropped_and_picked_digits_show_their_labels(
    browser: WebDriver, page: GatewayProcess, tmp_path: Path
) -> None:
    browser.set_window_size(1000, 900)
    browser.get(page.url)
    dropped, picked = digit_paths(20)[:6], digit_paths(20)[6:12]
    # The model list fills in after the page loads and widens the row the Explain box is
    # in: a click sent as it lays out lands where the box was (no explanation asked).
    deadline = time.monotonic() + 30
    while len(browser.find_elements(By.CSS_SELECTOR, "#model option")) < 2:
        assert time.monotonic() < deadline, "the page never listed the models"
        time.sleep(0.05)
    browser.find_element(By.ID, "explain").click()
    assert browser.find_element(By.ID, "explain").is_selected()
    drop(browser, dropped)
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in picked))
    shown = answers(browser, 12)
    assert shown == {p.name: label_of(p) for p in dropped + picked}
    # Each answer has its top-k bars and, asked for, its heatmap.
    card = browser.find_element(By.CSS_SELECTOR, "li.job[data-status=SUCCESS]")
    assert len(card.find_elements(By.CSS_SELECTOR, ".topk li")) == 3
    src = card.find_element(By.CLASS_NAME, "heatmap").get_attribute("src") or ""
    if not src.startswith("data:image/png;base64,"):  # say what the job's answer held
        job_id = card.get_attribute("data-job-id")
        answer = httpx.get(f"{page.url}/v1/jobs/{job_id}", timeout=10).text
        pytest.fail(f"no heatmap for job {job_id}; its answer: {answer[:1500]}")
    shot = tmp_path / "web-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("BATCHERY_SCREENSHOT"):  # how docs/web-page.png was made
        shutil.copy(shot, os.environ["BATCHERY_SCREENSHOT"])


def test_the_page_fits_a_phone_and_says_what_a_refusal_was(
    browser: WebDriver, page: GatewayProcess, tmp_path: Path
) -> None:
    browser.set_window_size(390, 844)
    browser.get(page.url)
    bad = tmp_path / "not-really.png"
    bad.write_bytes(b"this is text, not a picture")
    drop(browser, [digit_paths(1)[0], bad])
    deadline = time.monotonic() + 30
    while not browser.find_elements(By.CSS_SELECTOR, "li.job[data-status=REFUSED]"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    error = browser.find_element(By.CSS_SELECTOR, "li.job[data-status=REFUSED] .error").text
    assert "not-really.png" in error and "not a readable image" in error
    width = browser.execute_script("return [document.documentElement.scrollWidth, innerWidth]")
    assert width[0] <= width[1]  # nothing sticks out sideways on a phone


def test_with_api_keys_the_page_asks_for_one(
    browser: WebDriver, redis_server: RedisServer, worker: WorkerProcess, tmp_path: Path
) -> None:
    key, line = new_key("browser")
    keys = tmp_path / "keys"
    keys.write_text(line + "\n")
    with GatewayProcess(redis_server.url, env={"BATCHERY_API_KEYS": str(keys)}) as gateway:
        browser.set_window_size(1000, 900)
        browser.get(gateway.url)
        browser.execute_script("localStorage.clear()")
        browser.get(gateway.url)
        field = browser.find_element(By.ID, "key")
        deadline = time.monotonic() + 10
        while not field.is_displayed():
            assert time.monotonic() < deadline, "the page did not ask for a key"
            time.sleep(0.1)
        field.send_keys(key)
        browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        path = digit_paths(1)[0]
        drop(browser, [path])
        assert answers(browser, 1) == {path.name: label_of(path)}


def drop_named(driver: WebDriver, files: list[tuple[str, bytes]]) -> None:
    """Drop files of any name (a browser's File may be named anything a disk refuses)."""
    named = [{"name": name, "data": base64.b64encode(data).decode()} for name, data in files]
    driver.execute_script(
        """
        const transfer = new DataTransfer();
        for (const f of arguments[0]) {
          const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
          transfer.items.add(new File([bytes], f.name, {type: "image/png"}));
        }
        const zone = document.getElementById("drop");
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
        """,
        named,
    )


def test_a_refused_file_named_with_markup_shows_its_name_as_text(
    browser: WebDriver, page: GatewayProcess
) -> None:
    markup = "<img src=x onerror=window.__injected=1>.png"
    browser.set_window_size(1000, 900)
    browser.get(page.url)
    drop_named(browser, [(markup, b"this is text, not a picture")])
    deadline = time.monotonic() + 30
    while not browser.find_elements(By.CSS_SELECTOR, "li.job[data-status=REFUSED]"):
        assert time.monotonic() < deadline, "the refusal was not shown"
        time.sleep(0.1)
    card = browser.find_element(By.CSS_SELECTOR, "li.job[data-status=REFUSED]")
    error = card.find_element(By.CLASS_NAME, "error")
    # The server's refusal names the file; the page shows that name as the text it is.
    assert error.text.startswith(f"{markup}: not a readable image"), error.text
    assert card.find_element(By.CLASS_NAME, "name").text == markup
    assert card.get_attribute("data-file") == markup
    for element in (error, card.find_element(By.CLASS_NAME, "name")):
        assert element.find_elements(By.XPATH, "./*") == []  # text only, no element in it
    # No element was made of it anywhere, and no handler ran.
    assert browser.execute_script(
        "return document.querySelectorAll('img:not(.thumb):not(.heatmap)').length"
    ) == 0  # fmt: skip
    assert browser.execute_script("return window.__injected === undefined")


def test_the_pages_content_security_policy_allows_only_its_own_script(
    browser: WebDriver, page: GatewayProcess
) -> None:
    response = httpx.get(page.url)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    directives = {part.split()[0]: part.split()[1:] for part in policy.split(";") if part.strip()}
    # Scripts, styles, fonts, connections and frames: this origin only (default-src, with no
    # script-src or style-src to widen it, so no inline script, handler or eval); images also
    # from blob: (the thumbnails) and data: (the heatmaps); no plugins, no <base>, no framing.
    assert directives == {
        "default-src": ["'self'"],
        "img-src": ["'self'", "blob:", "data:"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "frame-ancestors": ["'none'"],
    }
    assert "unsafe" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    # And the browser holds the page to it: markup put in as HTML runs nothing.
    browser.get(page.url)
    browser.execute_script(
        """
        window.__ran = [];
        window.__refused = [];
        document.addEventListener("securitypolicyviolation",
                                  (e) => window.__refused.push(e.effectiveDirective));
        const box = document.createElement("div");
        box.innerHTML = '<img src=x onerror="window.__ran.push(1)">';
        document.body.appendChild(box);
        const inline = document.createElement("script");
        inline.textContent = "window.__ran.push(2)";
        document.body.appendChild(inline);
        """
    )
    deadline = time.monotonic() + 10
    while len(browser.execute_script("return window.__refused")) < 2:
        assert time.monotonic() < deadline, browser.execute_script("return window.__refused")
        time.sleep(0.1)
    assert browser.execute_script("return window.__ran") == []
    assert sorted(browser.execute_script("return window.__refused")) == [
        "script-src-attr", "script-src-elem"
    ]  # fmt: skip
