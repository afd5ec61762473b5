"""The chat page at ``/`` in headless Chromium: it lists the models, sends a question with an image, and shows
the answer as it streams in."""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("selenium", reason="selenium is not installed (the dev extra has it)")

from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.chromium import browser  # noqa: F401 - the fixture
from tests.serve.conftest import save_png
from tests.serve.test_app import ask, client


def test_chat_page_streams_an_answer_about_an_image(server, browser, tmp_path):  # noqa: F811
    image = save_png(tmp_path / "seven.png", seed=7)
    expected = client(server).chat.completions.create(
        model="a", messages=ask(["data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()],
                                "What is this?"), max_tokens=12).choices[0].message.content  # fmt: skip
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: len(Select(d.find_element("id", "model")).options) == 3)
    assert [o.text for o in Select(browser.find_element("id", "model")).options] == ["base", "a", "b"]
    Select(browser.find_element("id", "model")).select_by_visible_text("a")
    browser.find_element("id", "image").send_keys(str(image))
    tokens = browser.find_element("id", "max-tokens")
    tokens.clear()
    tokens.send_keys("12")
    browser.find_element("id", "question").send_keys("What is this?")
    # count the answer's text changes: a streamed answer grows several times
    browser.execute_script("""
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById('log'),
            {subtree: true, childList: true, characterData: true});""")
    browser.find_element("id", "send").click()
    answer = wait.until(lambda d: d.find_element("css selector", "#answer-1[data-done='true']"))
    assert answer.get_attribute("class") == "turn assistant"
    assert browser.execute_script("return document.getElementById('answer-1').textContent") == expected
    assert browser.execute_script("return window.updates") > 3
    shown = browser.find_element("css selector", ".turn.user img")
    assert shown.get_attribute("src").startswith("data:image/png;base64,")
