"""The review page in a real browser (headless Chromium via selenium): click, press a key, reload, compare.

Needs Debian's `chromium` and `chromium-driver` packages and `pip install selenium`; without them the
test skips and says what to install (.ci/run installs them).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from kpipe.config import Config
from kpipe.data import relabels
from kpipe.stages import review
from test_review_server import write_suspects

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = pytest.mark.skipif(
    not (HAVE_SELENIUM and CHROMIUM and CHROMEDRIVER),
    reason="browser test needs headless Chromium: apt-get install -y chromium chromium-driver; pip install selenium "
    f"(found: selenium={HAVE_SELENIUM}, chromium={CHROMIUM}, chromedriver={CHROMEDRIVER})",
)


@pytest.fixture
def browser() -> Iterator[Any]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,900",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def server(tiny_cfg: Config) -> Iterator[review.ReviewServer]:
    write_suspects(tiny_cfg)
    srv = review.make_server(tiny_cfg, 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def shown(driver: Any) -> dict[str, str]:
    """id -> decision as the page shows it, read in one script (the page redraws rows after each click)."""
    return driver.execute_script(
        'return Object.fromEntries([...document.querySelectorAll("#rows section")]'
        '.map(s => [s.dataset.id, s.querySelector("span.d").textContent]))'
    )


def on_disk(srv: review.ReviewServer) -> dict[str, str]:
    table = relabels.read_relabels(srv.state.csv)
    return {i: d or "undecided" for i, d in zip(table["id"], table["decision"], strict=True)}


def wait_for(driver: Any, srv: review.ReviewServer, image_id: str, decision: str) -> None:
    """Until the click has reached the file and the page shows it."""
    WebDriverWait(driver, 10).until(
        lambda d: on_disk(srv)[image_id] == decision and shown(d)[image_id] == decision
    )


def test_click_key_reload_agree_with_the_csv(browser: Any, server: review.ReviewServer) -> None:
    browser.get(server.url)
    WebDriverWait(browser, 10).until(lambda d: len(shown(d)) == 4)
    assert set(shown(browser).values()) == {"undecided"}
    assert browser.find_element(By.ID, "counter").text.startswith("0 of 4 decided")
    loaded = (
        "return [...document.images].every(i => i.complete && i.naturalWidth > 0) && document.images.length"
    )
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(loaded))  # every thumbnail loads

    def section(image_id: str) -> Any:
        return browser.find_element(By.CSS_SELECTOR, f'#rows section[data-id="{image_id}"]')

    section("cat_000").find_element(By.CSS_SELECTOR, 'button[data-act="accept"]').click()
    wait_for(browser, server, "cat_000", "accept")
    section("dog_001").find_element(By.CSS_SELECTOR, 'button[data-act="drop"]').click()
    wait_for(browser, server, "dog_001", "drop")
    section("fox_002").find_element(By.TAG_NAME, "img").click()  # make it the current row, then the shortcut
    WebDriverWait(browser, 5).until(lambda d: "cur" in section("fox_002").get_attribute("class"))
    browser.find_element(By.TAG_NAME, "body").send_keys("k")
    wait_for(browser, server, "fox_002", "keep")
    browser.find_element(By.TAG_NAME, "body").send_keys(
        "2"
    )  # the next row (cat_003) accepted as class 2, dog
    wait_for(browser, server, "cat_003", "accept")

    browser.refresh()
    WebDriverWait(browser, 10).until(lambda d: len(shown(d)) == 4)
    expect = {"cat_000": "accept", "dog_001": "drop", "fox_002": "keep", "cat_003": "accept"}
    assert shown(browser) == on_disk(server) == expect
    assert relabels.read_relabels(server.state.csv).set_index("id").loc["cat_003", "suggested"] == "dog"
    assert browser.find_element(By.ID, "counter").text.startswith("4 of 4 decided")

    Select(browser.find_element(By.ID, "f-class")).select_by_value("fox")  # given or suggested fox
    WebDriverWait(browser, 5).until(lambda d: set(shown(d)) == {"dog_001", "fox_002"})
    Select(browser.find_element(By.ID, "f-class")).select_by_value("")
    score = browser.find_element(By.ID, "f-score")
    score.clear()
    score.send_keys("0.75")
    WebDriverWait(browser, 5).until(lambda d: set(shown(d)) == {"cat_000", "dog_001"})


def test_explain_report_images_load(browser: Any, tmp_path: Any) -> None:
    """The explain page opened from disk (file://): every picture on it loads."""
    from conftest import tiny_config, write_competition
    from kpipe.stages import explain, folds, train

    cfg = tiny_config(tmp_path, write_competition(tmp_path, n_per_class=6))
    folds.run(cfg)
    train.run(cfg)
    page = explain.run(cfg, images=3).explain_html
    browser.get(page.resolve().as_uri())
    loaded = (
        "return [...document.images].every(i => i.complete && i.naturalWidth > 0) && document.images.length"
    )
    n = WebDriverWait(browser, 10).until(lambda d: d.execute_script(loaded))
    assert n >= 10  # filters, 2 Grad-CAM grids, feature maps of every stage
