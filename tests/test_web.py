"""The web chat page in a real headless Chromium: load it, send a message to the tiny model, watch
streamed text appear, and stop a generation with the Stop button (the server cancels the row)."""

from __future__ import annotations

import shutil
import tempfile
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")

from helpers import LiveServer, serve_engine, wait_for  # noqa: E402

from llama_adapter.serve import build_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="headless browser test needs Chromium and chromedriver: apt-get install -y chromium chromium-driver",
    ),
]


@pytest.fixture(scope="module")
def live():
    e = serve_engine(step_delay=0.004)
    with LiveServer(build_app(e)) as s:
        s.engine = e
        yield s


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-test-")
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _set(driver, element_id, value):
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(str(value))


def test_page_streams_a_reply(live, browser):
    from selenium.webdriver.support.ui import Select

    browser.get(live.url + "/")
    wait_for(lambda: len(browser.find_elements("css selector", "#model option")) == 3, what="the model list")
    Select(browser.find_element("id", "model")).select_by_value("stories260k")
    _set(browser, "temperature", 0)
    _set(browser, "max-tokens", 40)
    browser.find_element("id", "input").send_keys("Once upon a time")
    browser.find_element("id", "send").click()
    wait_for(lambda: browser.find_elements("css selector", ".msg.assistant"), what="an assistant message")
    reply = browser.find_element("css selector", ".msg.assistant")
    wait_for(lambda: reply.get_attribute("data-finish") is not None, timeout=30, what="the reply to finish")
    text = reply.find_element("css selector", ".text").text
    assert text.strip(), "no text appeared"
    assert int(reply.get_attribute("data-chunks")) > 1, "the reply arrived in one piece, not streamed"
    assert reply.get_attribute("data-finish") in ("stop", "length")
    assert browser.find_element("css selector", ".msg.user").text == "Once upon a time"
    assert browser.find_element("id", "send").is_enabled()


def test_stop_button_cancels_on_the_server(live, browser):
    e = live.engine
    browser.get(live.url + "/")
    wait_for(lambda: len(browser.find_elements("css selector", "#model option")) == 3, what="the model list")
    _set(browser, "max-tokens", 450)
    _set(browser, "temperature", 1)
    before = e.snapshot()["cancelled"]
    # The story model may end a story early; make the page's request ignore EOS (an API extension)
    # so there is a long generation to stop.
    browser.execute_script(
        "const f = window.fetch; window.fetch = (u, o) => { if (o && o.body) { const b = JSON.parse(o.body);"
        " b.ignore_eos = true; o = {...o, body: JSON.stringify(b)}; } return f(u, o); };"
    )
    browser.find_element("id", "input").send_keys("Once upon a time")
    browser.find_element("id", "send").click()
    wait_for(lambda: browser.find_elements("css selector", ".msg.assistant"), what="an assistant message")
    reply = browser.find_element("css selector", ".msg.assistant")
    wait_for(lambda: int(reply.get_attribute("data-chunks") or 0) > 2, what="streaming to start")
    assert e.snapshot()["active"] == 1
    browser.find_element("id", "stop").click()
    wait_for(lambda: reply.get_attribute("data-finish") == "stopped", what="the page to stop")
    wait_for(lambda: e.snapshot()["cancelled"] == before + 1 and e.snapshot()["active"] == 0,
             what="the server to cancel the row")  # fmt: skip
    time.sleep(0.1)
    assert e.snapshot()["active"] == 0


def test_attach_takes_what_the_model_takes(live, browser, tmp_path):
    """'vis' takes image and video: a GIF goes out as an input_video part, a point cloud is refused
    on the page (the model takes no points), and a text-only model disables the control."""
    from PIL import Image
    from selenium.webdriver.support.ui import Select

    frames = [Image.new("RGB", (24, 24), (40 * i, 0, 0)) for i in range(4)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100)
    (tmp_path / "cloud.ply").write_text("ply\n")
    browser.get(live.url + "/")
    wait_for(lambda: len(browser.find_elements("css selector", "#model option")) == 3, what="the model list")
    Select(browser.find_element("id", "model")).select_by_value("tiny")
    assert not browser.find_element("id", "image").is_enabled()
    Select(browser.find_element("id", "model")).select_by_value("vis")
    picker = browser.find_element("id", "image")
    assert picker.is_enabled() and "video/*" in picker.get_attribute("accept")
    picker.send_keys(str(tmp_path / "cloud.ply"))
    wait_for(lambda: "takes image, video" in browser.find_element("id", "status").text, what="the refusal")
    browser.execute_script(
        "window.sent = []; const f = window.fetch; window.fetch = (u, o) => {"
        " if (o && o.body) window.sent.push(JSON.parse(o.body)); return f(u, o); };"
    )
    picker.send_keys(str(tmp_path / "clip.gif"))
    wait_for(lambda: "video: clip.gif" in browser.find_element("id", "image-name").text, what="the attachment")
    _set(browser, "max-tokens", 5)
    browser.find_element("id", "input").send_keys("Once upon a time")
    browser.find_element("id", "send").click()
    wait_for(lambda: browser.execute_script("return window.sent.length") == 1, what="the request")
    part = browser.execute_script("return window.sent[0].messages[0].content[1]")
    assert part["type"] == "input_video" and part["input_video"]["format"] == "gif" and part["input_video"]["data"]
    reply = browser.find_elements("css selector", ".msg.assistant")[-1]
    wait_for(lambda: reply.get_attribute("data-finish") in ("stop", "length"), timeout=30, what="the reply")
    assert "[video: clip.gif]" in browser.find_elements("css selector", ".msg.user")[-1].text
