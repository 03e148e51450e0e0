"""The review page in a real browser: Debian's headless Chromium driven by selenium, clicks, keys and a reload.

``make browser`` (scripts/browser-deps.sh) installs Chromium and chromedriver from Debian's packages; no
browser is downloaded at test time. Without them the test fails as root (the set-up is incomplete) and
skips otherwise, naming the command. ``ORPOLAB_REVIEW_SCREENSHOT=docs/review.png`` also saves the page's
screenshot there (the README's).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from orpolab.evaluate.report_human import human_section
from orpolab.evaluate.review import fold, ratings, source

from .review_fixture import ReviewServer, answer_text, make_evaluation

pytestmark = pytest.mark.subprocess  # the review server and chromedriver are processes

INSTALL = "apt-get install chromium chromium-driver (as root: make browser, or scripts/browser-deps.sh)"


def chromium():
    """A headless Chromium session, or a skip (not root) / failure (root) naming what to install."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser = None
    if not (browser and driver):
        message = f"the review page's browser test needs Debian's chromium, chromedriver and selenium: {INSTALL}"
        if os.geteuid() == 0:
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,640",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_rate_in_the_browser_with_clicks_keys_and_a_reload(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    sweep, folder = make_evaluation(tmp_path)
    # The prompts are composed here once (review/prompts.json), so the server starts without the training stack.
    source.load(sweep)
    browser = chromium()
    server = ReviewServer(sweep, "alice")
    sides: dict[int, dict[str, str]] = {}  # prompt -> model -> the side the page showed it on
    try:
        wait = WebDriverWait(browser, 30)

        def at_item(k: int) -> None:
            """Wait for the k-th item (prompt k) and note which side shows which model."""
            wait.until(lambda d: d.find_element(By.ID, "count").text == f"{k} of 5 rated")
            shown = browser.find_element(By.ID, "answer-A").text
            sides[k] = ({"winner": "A", "base": "B"} if shown == answer_text("winner", k)
                        else {"base": "A", "winner": "B"})
            assert shown == answer_text("base" if sides[k]["base"] == "A" else "winner", k)

        def key(k: str) -> None:
            """A key press where the focus is (a button just clicked, or the page after a reload)."""
            ActionChains(browser).send_keys(k).perform()

        browser.get(server.url + "/")
        at_item(0)
        page = browser.page_source
        assert "winner" not in page and "base" not in browser.find_element(By.ID, "rating").text
        assert not browser.find_element(By.ID, "reference").is_displayed()
        key("r")  # the reference, behind its switch
        assert browser.find_element(By.ID, "reference").text.startswith("The correct value is")
        browser.find_element(By.ID, f"tag-{sides[0]['base']}-no_stop").click()
        # Letters that are keys (a, t, s, r): typed into the note, not taken as ratings.
        browser.find_element(By.ID, "note").send_keys("wrong value, does not stop")
        browser.save_screenshot(str(tmp_path / "review.png"))
        if os.environ.get("ORPOLAB_REVIEW_SCREENSHOT"):
            shutil.copy(tmp_path / "review.png", os.environ["ORPOLAB_REVIEW_SCREENSHOT"])
        browser.find_element(By.ID, f"choose-{sides[0]['winner']}").click()  # prompt 0: the winner, by a click
        at_item(1)
        assert browser.find_element(By.ID, "note").get_attribute("value") == ""
        key("t")  # prompt 1: a tie, by a key
        at_item(2)
        browser.refresh()  # a reload mid-way continues where the reviewer stopped
        at_item(2)
        key(sides[2]["base"].lower())  # prompt 2: the base, by its key
        at_item(3)
        browser.find_element(By.ID, f"choose-{sides[3]['winner']}").click()  # prompt 3: the winner
        at_item(4)
        key("s")  # prompt 4: skipped
        wait.until(lambda d: d.find_element(By.ID, "finished").is_displayed())
        rows = browser.find_elements(By.CSS_SELECTOR, "#reveal tr")
        assert len(rows) == 5 and "wrong value, does not stop" in rows[0].text and "winner" in rows[0].text
    finally:
        browser.quit()
        server.kill()

    given = ratings.read_ratings(ratings.ratings_file(folder, "alice"))
    preferred = [{"A": r["a"], "B": r["b"]}.get(r["choice"], r["choice"]) for r in given]
    assert [(r["prompt"], p) for r, p in zip(given, preferred, strict=True)] == [
        (0, "winner"), (1, "tie"), (2, "base"), (3, "winner"), (4, "skip")]
    for r in given:
        assert sides[r["prompt"]] == {r["a"]: "A", r["b"]: "B"}  # the recorded order is the one shown
    assert given[0]["tags"] == {sides[0]["base"]: ["no_stop"], sides[0]["winner"]: []}
    assert given[0]["note"] == "wrong value, does not stop" and all(r["note"] == "" for r in given[1:])

    # The judge: +1 on prompt 0 (agrees), 0 on 1 (agrees), +1 on 2 (the human: -1), 0 on 3 (the human: +1).
    scores = {"base": {0: 3, 1: 4, 2: 2, 3: 3, 4: 1}, "winner": {0: 5, 1: 4, 2: 4, 3: 3, 4: 5}}
    h = fold.gather(folder, ("base", "winner"), scores, n_resamples=300)
    text = "\n".join(human_section(h))
    # Human: 2 wins, 1 tie, 1 loss -> (2 + ½) / 4 = 0.625. Agreement 2 of 4 with ties; without ties prompts 0
    # and 2, 1 of 2. Kappa: human (-1, 0, +1) = (1, 1, 2), judge (0, 2, 2); chance 6/16 = 0.375;
    # (0.5 - 0.375) / 0.625 = 0.2.
    assert "| base vs winner | 2 / 1 / 1 | 0.625 [" in text
    assert "| 50% of 4 | 50% of 2 | 0.200 (observed 0.500, chance 0.375) |" in text
    chose_a = sum(sides[p][m] == "A" for p, m in ((0, "winner"), (2, "base"), (3, "winner")))
    assert h["position"]["value"] == pytest.approx(chose_a / 3)
    assert h["tags"] == {"base": {"no_stop": 1}}
    assert Path(tmp_path / "review.png").stat().st_size > 10_000
