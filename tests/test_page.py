"""The pairing page at `/` in a real browser: Debian's headless Chromium, driven by selenium.

Two browsers (two processes, as two devices) pair through the page: one
creates, the other opens the shared link; they exchange messages both ways,
one reloads mid-conversation, the server is killed with `kill -9` and
restarted, then drained with SIGTERM and restarted. After each, both pages
must recover by themselves and show every message exactly once, in seq
order. The page is read through its `data-testid` attributes only. A failing
step saves a screenshot of each browser (its path is in the failure).

Chromium and its driver come from Debian (`chromium`, `chromium-driver`,
installed by test.sh); selenium is given the driver's path, so it never
downloads a browser or a driver of its own. Missing ones fail the test.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from helpers import PROCESS_TIMEOUT, Server, ServerFactory, http_get
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 30.0  # seconds a page may take to reach a state (reconnects back off up to 10 s; a busy machine)
PHONE = (390, 844)
DESKTOP = (1024, 800)
T = TypeVar("T")

# Every shown message, as the page shows it: who, its seq (once known), its text, its state.
READ_MESSAGES = """
return [...document.querySelectorAll('[data-testid="messages"] [data-testid="message"]')].map((row) => ({
  from: row.dataset.from,
  seq: row.dataset.seq === undefined ? null : Number(row.dataset.seq),
  text: row.querySelector('.text').textContent,
  state: row.dataset.state,
}));
"""


class Page:
    """One browser (its own Chromium process) showing the page."""

    def __init__(self, name: str, size: tuple[int, int], profile: Path, log: Path) -> None:
        for binary in (CHROMIUM, CHROMEDRIVER):
            if shutil.which(binary) is None:
                pytest.fail(f"{binary} is missing: apt-get install chromium chromium-driver (test.sh does, as root)")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",  # as root, in a container
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            # No calls home: this machine's network is closed, and a test needs none.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
        ):
            options.add_argument(argument)
        self.name = name
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(log)), options=options)
        self.driver.set_page_load_timeout(30)

    def quit(self) -> None:
        self.driver.quit()

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait(lambda: self.driver.execute_script("return document.readyState") == "complete", "the page loaded")
        self.wait(lambda: self.state() != "" and self.text("status") != "Loading…", "the page script ran")

    def element(self, testid: str) -> Any:
        return self.driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]')

    def text(self, testid: str) -> str:
        script = f"return document.querySelector('[data-testid=\"{testid}\"]').textContent"
        return str(self.driver.execute_script(script))

    def visible(self, testid: str) -> bool:
        return bool(self.element(testid).is_displayed())

    def click(self, testid: str) -> None:
        self.element(testid).click()

    def state(self) -> str:
        """The status line's data-state."""
        return str(self.element("status").get_attribute("data-state") or "")

    def messages(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.driver.execute_script(READ_MESSAGES)
        return result

    def type_message(self, text: str) -> None:
        """Type into the message box and press Enter (the keyboard path)."""
        box = self.element("message-input")
        box.click()
        box.send_keys(text, Keys.ENTER)

    def wait(self, check: Callable[[], T], what: str | Callable[[], str], within: float = WAIT) -> T:
        """Poll `check()` until it returns a true value, and return it; fail after `within` s."""
        deadline = time.monotonic() + within
        last: T | WebDriverException | None = None
        for _ in range(int(within / 0.05) + 1):
            try:
                value = check()
            except WebDriverException as exc:  # mid-reload
                last = exc
            else:
                if value:
                    return value
                last = value
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        described = what if isinstance(what, str) else what()
        raise AssertionError(f"{self.name}: {described} not reached within {within} s (last: {last!r})")

    def wait_state(self, state: str, within: float = WAIT) -> None:
        self.wait(lambda: self.state() == state, lambda: f"status {state} (now {self.text('status')!r})", within)


@pytest.fixture
def pages(tmp_path: Path) -> Iterator[Callable[[str, tuple[int, int]], Page]]:
    """Start browsers: `pages(name, (width, height))`; all quit at the end."""
    started: list[Page] = []

    def start(name: str, size: tuple[int, int]) -> Page:
        page = Page(name, size, tmp_path / f"profile-{name}", tmp_path / f"chromedriver-{name}.log")
        started.append(page)
        return page

    yield start
    for page in started:
        page.quit()


@contextmanager
def step(name: str, shots: Path, *pages: Page) -> Iterator[None]:
    """A named step of a test: when it fails, each page's screenshot is saved to `shots`."""
    try:
        yield
    except BaseException as exc:
        shots.mkdir(parents=True, exist_ok=True)
        saved = []
        for page in pages:
            path = shots / f"{name.replace(' ', '-')}-{page.name}.png"
            try:
                page.driver.save_screenshot(str(path))
                saved.append(str(path))
            except WebDriverException:
                pass
        raise AssertionError(f"step {name!r} failed; screenshots: {saved}") from exc


def texts(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["from"], m["text"]) for m in messages]


def assert_conversation(page: Page, expected: list[tuple[str, str]]) -> None:
    """The page shows exactly `expected` (from, text), each stored or received, in ascending seq order."""

    def settled() -> bool:
        shown = page.messages()
        return texts(shown) == expected and all(m["seq"] is not None for m in shown)

    page.wait(settled, lambda: f"the conversation {expected} (shown: {texts(page.messages())})")
    seqs = [m["seq"] for m in page.messages()]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs


def mirrored(conversation: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The same conversation seen from the other side."""
    return [("peer" if who == "me" else "me", text) for who, text in conversation]


def restart(server: Server, how: signal.Signals) -> None:
    if how == signal.SIGKILL:
        server.kill()
    else:
        server.signal(how)
        assert server.wait(PROCESS_TIMEOUT) == 0
    server.start()


def test_two_browsers_pair_and_survive_reload_kill_and_drain(
    tandem_factory: ServerFactory, pages: Callable[[str, tuple[int, int]], Page], tmp_path: Path
) -> None:
    server = tandem_factory(SHUTDOWN_GRACE="3")
    shots = tmp_path / "screenshots"
    a = pages("A", PHONE)
    b = pages("B", DESKTOP)

    with step("create", shots, a):
        a.open(server.http + "/")
        assert a.state() == "idle"
        assert a.visible("join-code") and a.visible("join"), "join is there from the start"
        a.click("create")
        a.wait_state("waiting")
        code = a.text("code")
        link = a.element("link").get_attribute("href")
        assert link == f"{server.http}/#{code}", link

    with step("join by link", shots, a, b):
        b.open(link)
        b.wait_state("paired")
        a.wait_state("paired")
        assert b.text("code") == code
        assert a.text("peer") == "Peer: online"

    conversation: list[tuple[str, str]] = []  # as A sees it
    with step("exchange", shots, a, b):
        a.type_message("hello from A")
        conversation.append(("me", "hello from A"))
        assert_conversation(b, mirrored(conversation))
        b.element("message-input").send_keys("hello from B")
        b.click("send")
        conversation.append(("peer", "hello from B"))
        assert_conversation(a, conversation)
        assert_conversation(b, mirrored(conversation))
        assert [m["state"] for m in a.messages()] == ["stored", "received"]

    with step("reload", shots, a, b):
        b.driver.refresh()
        a.type_message("sent while B reloads")
        conversation.append(("me", "sent while B reloads"))
        b.wait_state("paired")
        a.wait_state("paired")
        assert_conversation(b, mirrored(conversation))
        assert_conversation(a, conversation)

    for fault, how in (("kill -9", signal.SIGKILL), ("drain", signal.SIGTERM)):
        with step(fault, shots, a, b):
            if how == signal.SIGKILL:
                server.kill()
                a.wait_state("reconnecting")
                b.wait_state("reconnecting")
                text = "sent while the server is down"
                a.type_message(text)
                # Shown at once, as sending, without a seq; the input stays usable.
                a.wait(lambda: a.messages()[-1]["state"] == "sending", "shown as sending")
                assert a.messages()[-1]["seq"] is None and a.element("send").is_enabled()
                conversation.append(("me", text))
                server.start()
            else:
                restart(server, how)
                text = f"after the {fault}"
                b.type_message(text)
                conversation.append(("peer", text))
            a.wait_state("paired")
            b.wait_state("paired")
            assert_conversation(a, conversation)
            assert_conversation(b, mirrored(conversation))

    with step("reload after recovery", shots, a, b):
        a.driver.refresh()
        a.wait_state("paired")
        assert_conversation(a, conversation)

    with step("leave", shots, a, b):
        a.click("leave")
        a.wait_state("closed")
        assert a.visible("create") and a.visible("join-code")
        b.wait_state("waiting")
        assert "left" in b.text("status")


def test_join_by_typed_code_keyboard_labels_phone_width(
    tandem_factory: ServerFactory, pages: Callable[[str, tuple[int, int]], Page], tmp_path: Path
) -> None:
    server = tandem_factory()
    shots = tmp_path / "screenshots"
    a = pages("A", DESKTOP)
    b = pages("B", PHONE)

    with step("page", shots, a, b):
        status, headers, _ = http_get(server.http + "/")
        assert status == 200 and "default-src 'none'" in headers["content-security-policy"]
        a.open(server.http + "/")
        b.open(server.http + "/")
        # Every control is labelled, and nothing is wider than a phone.
        unlabelled = b.driver.execute_script(
            """return [...document.querySelectorAll('input, button, textarea, select')]
                 .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                                 && !el.textContent.trim())
                 .map((el) => el.outerHTML)"""
        )
        assert unlabelled == []
        assert b.driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")

    with step("a code that is no code", shots, b):
        b.element("join-code").send_keys("hello", Keys.ENTER)
        b.wait(lambda: "not a code" in b.text("join-error").lower(), "an error for a bad code")
        assert b.state() == "idle"

    with step("join by typing", shots, a, b):
        a.click("create")
        a.wait_state("waiting")
        code = a.text("code")
        # As a person types it: lower case, a space, O for 0 and l for 1.
        typed = f"{code[:4]} {code[4:]}".lower().replace("0", "o").replace("1", "l")
        box = b.element("join-code")
        box.clear()
        box.send_keys(typed, Keys.ENTER)
        b.wait_state("paired")
        a.wait_state("paired")
        assert b.text("code") == code
        assert b.driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")

    with step("keyboard only", shots, a, b):
        # After joining, the focus is in the message box: type and press Enter.
        b.driver.switch_to.active_element.send_keys("typed on a phone", Keys.ENTER)
        assert_conversation(a, [("peer", "typed on a phone")])

    with step("peer offline and back", shots, a, b):
        b.driver.get("about:blank")  # B's tab leaves the page without leaving the session
        a.wait_state("peer-offline")
        assert a.text("peer") == "Peer: offline"
        a.type_message("while B is away")
        b.open(server.http + "/")  # the same tab: its sessionStorage still holds the session
        b.wait_state("paired")
        a.wait_state("paired")
        assert_conversation(b, [("me", "typed on a phone"), ("peer", "while B is away")])

    with step("frame log", shots, a):
        assert not a.element("frame-log-lines").is_displayed()
        a.driver.find_element(By.CSS_SELECTOR, '[data-testid="frame-log"] summary').click()
        log = a.wait(lambda: a.text("frame-log-lines"), "frames in the log")
        assert "session:created" in log and '"token":"…"' in log
        assert '"type":"message"' in log


def test_expiry_is_shown_and_forgotten(
    tandem_factory: ServerFactory, pages: Callable[[str, tuple[int, int]], Page], tmp_path: Path
) -> None:
    server = tandem_factory(SESSION_IDLE_TIMEOUT="2", SWEEP_INTERVAL="0.2")
    a = pages("A", PHONE)
    with step("expire", tmp_path / "screenshots", a):
        a.open(server.http + "/")
        a.click("create")
        a.wait_state("waiting")
        a.wait_state("expired", within=10)
        assert "expired" in a.text("status")
        assert a.visible("create") and a.visible("join-code"), "a new session can start at once"
        a.driver.refresh()
        a.wait_state("idle")
