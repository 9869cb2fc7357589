"""The chat page at `/` in a real headless Chromium (Selenium + Debian's chromium/chromedriver),
against the real server and engine on the `tiny_workdir` run.

Why a real browser: the page's streaming (fetch + ReadableStream + SSE parsing), its Stop button
(AbortController -> the server sees the disconnect and cancels the engine request) and its
in-page conversation only exist in a browser's JavaScript. An `EngineProbe` wraps the engine
instance so the tests can see what the server really ran: each request's prompt ids, the text it
streamed, and how it finished; it can also hold decoding mid-reply until a cancel arrives, so a
Stop click always lands on a running generation, however fast the tiny model is.

The screenshot goes to runs/screenshots/chat_page.png (relative to the repo root).
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest

from lm.inference.engine import Engine
from lm.serve.app import create_app
from lm.serve.runner import ServerThread
from lm.tokenizer import chat

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "runs" / "screenshots" / "chat_page.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SLOTS = 2
API_KEY = "page-test-key"
WAIT_S = 90  # the first reply includes compiling the engine's steps on a busy 2-core machine


class EngineProbe:
    """Wraps one engine's submit/cancel/step (instance attributes; the server calls them the
    usual way). Records per request: prompt ids, streamed text, finish reason. With `hold`
    set, decoding pauses once a running request has a token, until some request is cancelled
    (or `hold_timeout_s` passes)."""

    def __init__(self, engine: Engine, hold_timeout_s: float = 30.0):
        self.engine, self.hold_timeout_s = engine, hold_timeout_s
        self.prompts: dict[int, list[int]] = {}
        self.texts: dict[int, str] = {}
        self.finish_reasons: dict[int, str] = {}
        self.hold = False
        self.holding = threading.Event()  # set while a step waits for a cancel
        self.cancelled = threading.Event()
        self._tokens: dict[int, int] = {}  # live requests -> tokens so far
        submit, cancel, step = engine.submit, engine.cancel, engine.step

        def probed_submit(prompt_ids, params, callback=None):
            def on_output(out) -> None:
                rid = out.request_id
                self.texts[rid] = self.texts.get(rid, "") + out.text
                self._tokens[rid] = self._tokens.get(rid, 0) + len(out.token_ids)
                if out.finished:
                    self.finish_reasons[rid] = out.finish_reason
                    self._tokens.pop(rid, None)
                if callback is not None:
                    callback(out)

            rid = submit(prompt_ids, params, on_output)
            self.prompts[rid] = list(prompt_ids)
            return rid

        def probed_cancel(request_id: int) -> None:
            cancel(request_id)
            self.cancelled.set()

        def held_step() -> None:
            if self.hold and not self.cancelled.is_set() and any(self._tokens.values()):
                self.holding.set()
                self.cancelled.wait(self.hold_timeout_s)
                self.holding.clear()
            step()

        engine.submit, engine.cancel, engine.step = probed_submit, probed_cancel, held_step

    def last_request(self) -> int:
        return max(self.prompts)


@pytest.fixture(scope="module")
def served(tiny_workdir):
    """(open server URL, server URL that needs API_KEY, probe): two apps on one engine."""
    engine = Engine.from_workdir(tiny_workdir, slots=SLOTS)
    probe = EngineProbe(engine)
    app = create_app(engine, model_name="tiny")
    keyed_app = create_app(engine, model_name="tiny", api_key=API_KEY, owns_engine=False)
    with ServerThread(keyed_app) as keyed_url, ServerThread(app) as url:
        yield url, keyed_url, probe


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: `make test` installs them "
            "(apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lm-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1000,760",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# ---- page helpers ---------------------------------------------------------------------------


def _by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def _set_value(driver, element_id: str, value) -> None:
    field = _by_id(driver, element_id)
    field.clear()
    field.send_keys(str(value))


def _wait(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"timed out waiting for {what}"
    )


def _assistant_messages(driver) -> list[dict]:
    """Each assistant message's state, classes and exact text (textContent, unstripped)."""
    return driver.execute_script(
        """return [...document.querySelectorAll('#messages .message[data-role="assistant"]')]
            .map(m => ({state: m.dataset.state, finished: m.classList.contains('finished'),
                        text: m.querySelector('.content').textContent}));"""
    )


def _page_state(driver) -> dict:
    return driver.execute_script(
        "const s = window.lmChat.state; return {conversation: s.conversation, "
        "requests: s.requests, busy: s.busy};"
    )


def _wait_finished(driver, count: int) -> list[dict]:
    def done(d):
        messages = _assistant_messages(d)
        return len(messages) == count and messages[-1]["state"] != "streaming" and messages

    messages = _wait(driver, done, f"assistant reply #{count} to end")
    assert messages[-1]["state"] == "done", f"the reply did not finish: {messages[-1]}"
    assert messages[-1]["finished"]
    return messages


def _contains(haystack: list[int], needle: list[int]) -> bool:
    starts = range(len(haystack) - len(needle) + 1)
    return any(haystack[i : i + len(needle)] == needle for i in starts)


# ---- tests ----------------------------------------------------------------------------------


def test_chat_page_streams_keeps_history_and_stops(served, browser):
    from selenium.webdriver.common.keys import Keys

    url, _, probe = served
    vocab = probe.engine.vocab
    user_id = chat.role_token_ids(vocab)["user"]
    browser.get(url + "/")
    _wait(browser, lambda d: _by_id(d, "model_name").text == "tiny", "the model name")
    _set_value(browser, "temperature", 0)
    _set_value(browser, "max_tokens", 24)

    # Turn 1: Shift+Enter is a newline, Enter sends; markup in a message stays text.
    first = "Hello <b>there</b>\nhow are you?"
    prompt = _by_id(browser, "prompt")
    prompt.send_keys("Hello <b>there</b>", Keys.SHIFT, Keys.ENTER, Keys.NULL, "how are you?")
    prompt.send_keys(Keys.ENTER)
    messages = _wait_finished(browser, 1)
    reply = messages[0]["text"]
    assert reply.strip(), "the streamed reply is empty"
    rid = probe.last_request()
    assert reply == probe.texts[rid], "the page's text is not what the server streamed"
    assert browser.execute_script("return document.querySelectorAll('#messages b').length") == 0
    state = _page_state(browser)
    assert state["conversation"] == [
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply},
    ]
    sent = state["requests"][-1]
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["max_tokens"] == 24

    # Turn 2 (Send button): the server gets the whole history in its prompt.
    second = "Tell me more."
    _by_id(browser, "prompt").send_keys(second)
    _by_id(browser, "send").click()
    messages = _wait_finished(browser, 2)
    rid = probe.last_request()
    ids = probe.prompts[rid]
    assert ids.count(user_id) == 2, "the second request did not carry the first user turn"
    assert _contains(ids, vocab.encode(first)) and _contains(ids, vocab.encode(second))
    assert _contains(ids, vocab.encode(reply))
    assert messages[1]["text"] == probe.texts[rid]
    roles = [m["role"] for m in _page_state(browser)["requests"][-1]["messages"]]
    assert roles == ["user", "assistant", "user"]

    # New chat, then Stop mid-reply: the fetch is aborted and the server cancels the request.
    _by_id(browser, "clear").click()
    assert _assistant_messages(browser) == [] and _page_state(browser)["conversation"] == []
    _set_value(browser, "max_tokens", 100)
    probe.cancelled.clear()
    probe.hold = True
    try:
        _by_id(browser, "prompt").send_keys("Tell me a long story.", Keys.ENTER)
        assert probe.holding.wait(WAIT_S), "the long reply never started"
        assert not _by_id(browser, "send").is_enabled()
        _by_id(browser, "stop").click()
        _wait(browser, lambda d: _assistant_messages(d)[-1]["state"] == "stopped", "Stop")
        assert probe.cancelled.wait(10), "the server did not cancel the engine request"
    finally:
        probe.hold = False
    rid = probe.last_request()
    _wait(browser, lambda d: rid in probe.finish_reasons, "the engine to free the slot", 10)
    assert probe.finish_reasons[rid] == "abort"
    assert probe.engine.stats()["running"] == 0
    assert _by_id(browser, "send").is_enabled() and not _by_id(browser, "stop").is_enabled()
    partial = _assistant_messages(browser)[-1]["text"]
    # A partial reply stays in the conversation; a stop before any text drops the turn.
    kept = [{"role": "user", "content": "Tell me a long story."}]
    kept = kept + [{"role": "assistant", "content": partial}] if partial else []
    assert _page_state(browser)["conversation"] == kept

    # The page still works after Stop.
    _set_value(browser, "max_tokens", 12)
    _by_id(browser, "prompt").send_keys("Thanks.", Keys.ENTER)
    messages = _wait_finished(browser, 2)
    assert messages[-1]["text"] == probe.texts[probe.last_request()]
    roles = [m["role"] for m in _page_state(browser)["requests"][-1]["messages"]]
    assert roles == [m["role"] for m in kept] + ["user"]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT))
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {SCREENSHOT}")


def test_first_message_with_the_default_settings(served, browser):
    """A new user changes nothing: the page's default Max tokens must not ask for more than the
    served context leaves after the prompt (the tiny models' context is 128 tokens)."""
    from selenium.webdriver.common.keys import Keys

    url, _, probe = served
    browser.get(url + "/")
    _wait(browser, lambda d: _by_id(d, "model_name").text == "tiny", "the model name")
    context = probe.engine.max_len
    assert _by_id(browser, "max_tokens").get_attribute("value") == str(context - 1)  # was 128
    _by_id(browser, "prompt").send_keys("Hello!", Keys.ENTER)
    messages = _wait_finished(browser, 1)
    assert not _by_id(browser, "error").is_displayed()
    rid = probe.last_request()
    assert messages[0]["text"] == probe.texts[rid]
    prompt = probe.prompts[rid]
    assert prompt == chat.apply_chat_template(
        probe.engine.vocab, [{"role": "user", "content": "Hello!"}]
    )
    asked = _page_state(browser)["requests"][-1]["max_tokens"]
    assert len(prompt) + asked == context  # the default asks for all the context leaves


def test_api_key_errors_show_in_page_and_key_is_kept(served, browser):
    from selenium.webdriver.common.keys import Keys

    _, keyed_url, probe = served
    browser.get(keyed_url + "/")
    _set_value(browser, "max_tokens", 8)
    _by_id(browser, "prompt").send_keys("Hi", Keys.ENTER)
    _wait(browser, lambda d: _assistant_messages(d)[-1]["state"] == "error", "the 401 error")
    error = _by_id(browser, "error")
    assert error.is_displayed() and "API key" in error.text
    assert _page_state(browser)["conversation"] == []
    assert _by_id(browser, "prompt").get_attribute("value") == "Hi"  # back in the box to retry

    _set_value(browser, "api_key", API_KEY)
    _by_id(browser, "send").click()
    messages = _wait_finished(browser, 2)
    assert messages[-1]["text"] == probe.texts[probe.last_request()]
    assert not _by_id(browser, "error").is_displayed()
    assert browser.execute_script("return localStorage.getItem('lm-chat.api-key')") == API_KEY
    browser.refresh()
    _wait(browser, lambda d: _by_id(d, "model_name").text == "tiny", "the model name, keyed")
    assert _by_id(browser, "api_key").get_attribute("value") == API_KEY


def test_sse_reader_handles_chunks_split_anywhere(served, browser):
    """The page's SSE reader gets a real stream's bytes in chunks of 1, 2, 3, 7 and 64 bytes
    (splitting lines, `data:` prefixes and UTF-8 characters), with LF and CRLF line ends, a
    comment, non-ASCII text and a last event without its blank line; it must yield exactly the
    events a plain parse of the whole text gives."""
    url, _, _ = served
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_tokens": 8,
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        raw = response.read().decode()
    delta = {"content": "héllo ✓ 😀 ünïcode"}
    extra = json.dumps({"choices": [{"index": 0, "delta": delta}]}, ensure_ascii=False)
    raw = raw.replace("data: [DONE]\n\n", f": keep-alive\ndata: {extra}\n\ndata: [DONE]")
    expected = [part[len("data: ") :] for part in raw.replace(": keep-alive\n", "").split("\n\n")]
    assert expected[-1] == "[DONE]" and len(expected) >= 4

    browser.get(url + "/")
    for text, size in itertools.product((raw, raw.replace("\n", "\r\n")), (1, 2, 3, 7, 64)):
        events = browser.execute_async_script(
            """const [text, size, done] = arguments;
            const bytes = new TextEncoder().encode(text);
            const stream = new ReadableStream({start(c) {
              for (let i = 0; i < bytes.length; i += size) c.enqueue(bytes.slice(i, i + size));
              c.close();
            }});
            (async () => {
              const out = [];
              for await (const data of window.lmChat.serverSentData(stream)) out.push(data);
              done(out);
            })().catch((e) => done('error: ' + e));""",
            text,
            size,
        )
        assert events == expected, f"chunks of {size} bytes"
