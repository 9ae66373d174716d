"""The studio in a real headless browser (Debian's Chromium and chromedriver, driven by Selenium), against the
real server started by ``alignlab studio`` on tiny-random: label by keyboard and mouse, reload mid-way, export,
train (DPO, 2 steps) and see the run finish, then a blind A/B round and its win rate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MISSING = "the browser tests need Debian's packages chromium and chromium-driver (apt-get install chromium " \
          "chromium-driver) and the Python package selenium"
try:
    import selenium  # noqa: F401
except ImportError:
    BROWSER = None
if not (BROWSER and DRIVER):
    if os.environ.get("CI") == "true":  # CI installs them (.ci/run): their absence there is a failure
        pytest.fail(MISSING, pytrace=False)
    pytest.skip(MISSING, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

XSS_PROMPT = '<b id="bold">bold?</b> <img src=x onerror="window.pwned=1"> Say hi.'


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("studio-browser")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join([XSS_PROMPT, "Name a colour.", "Count to three.", "Name a fruit.", "Say bye.",
                                  "Describe rain.", "Name a city."]) + "\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    process = subprocess.Popen(
        [sys.executable, "-m", "alignlab.cli", "studio", "--model", "tiny-random", "--prompts", str(prompts),
         "--db", str(folder / "studio.sqlite"), "--port", "0", "--k", "2", "--max-new-tokens", "8",
         "--ab-size", "3", "--train-steps", "2", "--train-batch-size", "2", "--labeller", "ann"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    while not any("open http" in line for line in lines):
        line = process.stdout.readline()
        assert line, "the studio did not start:\n" + "".join(lines)
        lines.append(line)
    url = next(line for line in lines if "open http" in line).split("open ", 1)[1].strip()
    yield {"url": url, "db": folder / "studio.sqlite"}
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(driver, predicate, timeout=120):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: predicate(d))


def labelled(driver) -> int:
    text = driver.find_element(By.ID, "progress").text
    return int(text.split("labelled ")[1].split(" ")[0]) if "labelled " in text else -1


def item_shown(driver) -> bool:
    return driver.find_element(By.ID, "label-item").is_displayed() and \
        len(driver.find_elements(By.CSS_SELECTOR, "#answers .answer")) == 2


def current_prompt(driver) -> str:
    return driver.find_element(By.ID, "prompt").text


def body_keys(driver, *keys):
    driver.find_element(By.TAG_NAME, "body").send_keys(*keys)


def test_label_reload_export_train_and_ab(server, browser):
    d = browser
    d.get(server["url"])
    wait(d, item_shown)

    # the first prompt's HTML shows as characters: no element made, no script run
    assert current_prompt(d) == XSS_PROMPT
    assert d.find_elements(By.ID, "bold") == [] and d.execute_script("return window.pwned") is None

    # 1: keyboard: B is better, Enter saves
    first = current_prompt(d)
    body_keys(d, "b")
    assert d.find_element(By.ID, "ranking").text.startswith("B > A")
    body_keys(d, Keys.ENTER)
    wait(d, lambda d: labelled(d) == 1 and item_shown(d) and current_prompt(d) != first)

    # 2: mouse: click A, then the save button
    second = current_prompt(d)
    d.find_elements(By.CSS_SELECTOR, "#answers .answer")[0].click()
    assert d.find_element(By.ID, "ranking").text.startswith("A > B")
    d.find_element(By.ID, "submit").click()
    wait(d, lambda d: labelled(d) == 2 and item_shown(d) and current_prompt(d) != second)

    # 3: a half-done judgement survives a reload: the same item, its ranking and the typed better answer
    third = current_prompt(d)
    body_keys(d, "a", "=", "b")
    assert d.find_element(By.ID, "ranking").text.startswith("A = B")
    d.find_element(By.ID, "better").send_keys("Hello! <i>really</i>")
    d.refresh()
    wait(d, item_shown)
    assert current_prompt(d) == third
    assert d.find_element(By.ID, "better").get_attribute("value") == "Hello! <i>really</i>"
    assert d.find_element(By.ID, "ranking").text.startswith("A = B")
    d.find_element(By.ID, "better").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(d, lambda d: labelled(d) == 3 and item_shown(d))

    # 4: all bad (X) with a written answer; 5: keyboard again
    body_keys(d, "x")
    assert d.find_element(By.ID, "ranking").text == "all bad"
    d.find_element(By.ID, "better").send_keys("A good answer.")
    d.find_element(By.ID, "better").send_keys(Keys.CONTROL, Keys.ENTER)
    wait(d, lambda d: labelled(d) == 4 and item_shown(d))
    body_keys(d, "a", Keys.ENTER)
    wait(d, lambda d: labelled(d) == 5)

    # export: the links the page offers, fetched by the page (same origin, same cookies)
    d.find_element(By.CSS_SELECTOR, 'nav button[data-view="people"]').click()
    assert "ann" in d.find_element(By.ID, "people").text
    d.find_element(By.ID, "export-filter").send_keys("ann")
    href = d.find_element(By.ID, "export-ranking").get_attribute("href")
    assert href.endswith("/api/export?format=ranking&labeller=ann")
    text = d.execute_async_script("fetch(arguments[0]).then(r => r.text()).then(arguments[1])", href)
    records = [json.loads(line) for line in text.splitlines()]
    # 4 ranked pairs (the tie of judgement 3 ranks its written answer over both) -> 1 + 1 + 2 + 2 + 1
    assert len(records) == 7 and records[0]["prompt"][0]["content"] == XSS_PROMPT
    sft = d.execute_async_script("fetch(arguments[0]).then(r => r.text()).then(arguments[1])",
                                 d.find_element(By.ID, "export-sft").get_attribute("href"))
    assert [json.loads(line)["messages"][-1]["content"] for line in sft.splitlines()] == \
        ["Hello! <i>really</i>", "A good answer."]

    # train from the page and watch the run finish
    d.find_element(By.CSS_SELECTOR, 'nav button[data-view="train"]').click()
    Select(d.find_element(By.ID, "kind")).select_by_value("dpo")
    steps = d.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys("2")
    d.find_element(By.ID, "start-train").click()
    # the table is rebuilt on every refresh: read a row in one script call, never through a stale element
    job_row = "const r = document.querySelector('#jobs tr[data-job]'); return r && [r.dataset.state, r.innerText];"
    wait(d, lambda d: (d.execute_script(job_row) or ["running"])[0] != "running", timeout=240)
    state, text = d.execute_script(job_row)
    assert state == "done", d.find_element(By.ID, "jobs").text
    assert "step 2/2" in text and "loss" in text

    # the blind A/B round: three pairs judged by keyboard and mouse, then the win rate with its interval
    d.find_element(By.CSS_SELECTOR, 'nav button[data-view="ab"]').click()
    wait(d, lambda d: len(Select(d.find_element(By.ID, "ab-job")).options) == 1, timeout=10)
    d.find_element(By.ID, "start-ab").click()
    for votes, choice in enumerate(("a", "=", "click-b")):
        wait(d, lambda d, votes=votes: d.find_element(By.ID, "ab-item").is_displayed()
             and f": {votes} of " in d.find_element(By.ID, "ab-status").text)
        if choice == "click-b":
            d.find_element(By.ID, "ab-b").click()
        else:
            body_keys(d, choice)
        wait(d, lambda d, votes=votes: f"{votes + 1} of " in d.find_element(By.ID, "ab-status").text)
    result = wait(d, lambda d: d.find_element(By.ID, "ab-result").text)
    assert "The trained model wins" in result and "95% interval" in result and "over 3 blind judgements" in result
    assert "1 ties" in result
    d.find_element(By.CSS_SELECTOR, 'nav button[data-view="label"]').click()
    assert d.execute_script("return window.pwned") is None
