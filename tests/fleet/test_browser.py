"""The status page in headless Chromium while the selftest mission runs on a real fleet.

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them when missing); without them
the test skips and says so. Selenium is told where both are, so it never downloads a browser.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet.conftest import Fleet, submit

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SCREENSHOT_DIR = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.fixture
def browser() -> Iterator[object]:
    if not (CHROMIUM and DRIVER):
        pytest.skip("headless Chromium not installed: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_fleet_page_follows_a_mission_live(fleet: Fleet, browser: object, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser  # selenium's WebDriver; typed loosely so the module imports without selenium
    fleet.start_fleetd()
    fleet.start_worker("w0")
    fleet.start_worker("w1")
    fleet.wait_workers(2)
    web = fleet.web_url()
    d.get(f"{web}/?token={fleet.web_token()}")  # type: ignore[attr-defined]  # signs in: a cookie
    wait = WebDriverWait(d, 60, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.ID, "live").text == "live")
    d.execute_script("window.__notReloaded = true")  # type: ignore[attr-defined]
    mission = submit(fleet, "selftest")

    # A task shows as running, then as succeeded, with no reload in between. The tables are re-drawn
    # on every note, so each look is one script: no element handle outlives a re-draw.
    def js(script: str) -> object:
        return d.execute_script(script)  # type: ignore[attr-defined]

    task_id = wait.until(
        lambda _: js(
            "const e = document.querySelector('#queue tr[data-task] .state-running');"
            "return e && e.closest('tr').dataset.task"
        )
    )
    assert str(task_id).startswith(mission + "/")
    wait.until(
        lambda _: (
            js(
                f"const e = document.querySelector('#recent tr[data-task=\"{task_id}\"] .state');"
                "return e && e.textContent"
            )
            == "succeeded"
        )
    )
    assert js("return window.__notReloaded === true")

    # The mission page, reached by its link, shows the gate table once the stats engine has judged.
    wait.until(lambda _: js(f"const a = document.querySelector('#missions tr[data-mission=\"{mission}\"] a');"
                            "if (a) a.click(); return !!a"))  # fmt: skip
    WebDriverWait(d, 120, poll_frequency=0.2).until(
        lambda _: js("return document.querySelectorAll('#gates tr[data-gate]').length") == 2
    )
    gates = js("return [...document.querySelectorAll('#gates tr[data-gate]')].map((e) => e.dataset.gate)")
    assert sorted(gates) == ["b_beats_a", "b_level_sane"]  # type: ignore[call-overload]
    assert d.find_elements(By.CSS_SELECTOR, "#gates svg circle")  # type: ignore[attr-defined]
    assert d.find_elements(By.CSS_SELECTOR, "#curves canvas")  # type: ignore[attr-defined]  # uPlot drew
    SCREENSHOT_DIR.mkdir(exist_ok=True)
    for target in (tmp_path / "mission.png", SCREENSHOT_DIR / "mission_page.png"):
        assert d.save_screenshot(str(target))  # type: ignore[attr-defined]
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]  # type: ignore[attr-defined]
    assert not errors, errors
