"""The web page of ``m2pt serve`` in a real headless Chromium (Selenium): upload the demo image, ask
the demo question, read the streamed answer from the page; it is ``m2pt generate``'s. A follow-up
question continues the conversation: its answer is the API's answer to the two-turn conversation."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from tests.cli.serving import Server, user_message
from tests.helpers import m2pt

webdriver = pytest.importorskip("selenium.webdriver", reason="the dev extra installs selenium")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,  # a browser, a server process and the demo adapter
    pytest.mark.skipif(
        not (CHROMIUM and DRIVER), reason="needs chromium and chromedriver: apt-get install chromium chromium-driver"
    ),
]


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def api_answer(server, messages) -> str:
    body = json.dumps({"messages": messages}).encode()
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def ask(browser, question: str, turn: int) -> str:
    """Type ``question``, press Ask, and wait for answer number ``turn`` (0-based) to finish streaming."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "ask").click()
    done = f".answer[data-done='1']:nth-of-type({2 * turn + 2})"
    element = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, done))
    assert "error" not in element.get_attribute("class"), element.text
    return element.get_attribute("textContent")


def test_the_page_streams_the_answer_of_m2pt_generate(demo_adapter, demo_images, browser, tmp_path):
    from selenium.webdriver.common.by import By

    image, question = demo_images[0]
    expected = m2pt("generate", "--adapter", demo_adapter, "--image", image, "--prompt", question, "--device", "cpu")
    with Server(demo_adapter, log=tmp_path / "serve.log") as server:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "image").send_keys(str(image))
        first = ask(browser, question, 0)
        assert first == expected.stdout.strip()
        follow_up = "Which digit is this?"
        second = ask(browser, follow_up, 1)
        history = [user_message(image, question), {"role": "assistant", "content": first}]
        assert second == api_answer(server, [*history, {"role": "user", "content": follow_up}])
        assert "serving demo-run" in browser.find_element(By.ID, "model").text
        browser.save_screenshot(str(tmp_path / "page.png"))
