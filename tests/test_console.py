"""The operators' page (`GET /ui`) in a real browser: Debian's chromium, headless, over the
DevTools protocol (tests/browser.py), against a `seg-sidecar` process the test starts on a log
directory that the real publisher writes. Fails, never skips, without chromium.

`SEG_UI_SCREENSHOT=docs/ui.png` also saves the page's screenshot there (how docs/ui.png is
made)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pyroaring import BitMap64

from publisher.publish import Publisher
from sidecar.server.http import openapi_bytes
from sidecar.transport.logdir import LogDirTransport
from tests.aerospike_fixture import publish_mirrored
from tests.aerospike_server.server import ThreadedAerospikeServer
from tests.browser import INSTALL_HINT, Browser, find_chromium
from tests.logtools import free_port, wait_http_ok

BIN = Path(sys.executable).parent
UI_DIR = Path(__file__).resolve().parents[1] / "sidecar" / "server" / "ui"
SPEC = json.loads(openapi_bytes())
MAX = 2**64 - 1
MARKUP = "<img src=x onerror=alert(1)>"
PARTITIONS = 3

FIRST = {
    "vip": BitMap64([1, 2, 3, MAX]),
    "cart:30m": BitMap64(range(100, 200)),
    "big.buyers": BitMap64(range(0, 300_000, 3)),
}

#: what the log holds now (test_page_updates_after_a_publish publishes more)
PUBLISHED = dict(FIRST)

ROWS = """[...document.querySelectorAll('#segments tbody tr')].map(tr => ({
  segment: tr.cells[0].textContent, version: Number(tr.cells[1].dataset.value),
  cardinality: Number(tr.cells[2].dataset.value), shown: tr.cells[2].textContent,
  updated: tr.cells[3].querySelector('time').dateTime, health: tr.cells[4].textContent}))"""


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class SidecarProcess:
    """`seg-sidecar --log-dir DIR` on a free port, HTTP only, returned once ready (or, with
    `ready=False`, once alive)."""

    def __init__(
        self, log_dir: Path, *args: str, env: dict[str, str] | None = None, ready: bool = True
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [
                str(BIN / "seg-sidecar"),
                "--log-dir",
                str(log_dir),
                "--uds",
                "",
                "--http",
                f"127.0.0.1:{self.port}",
                *args,
            ],  # fmt: skip
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        try:
            wait_http_ok(self.url + ("/readyz" if ready else "/healthz"), self.proc, 60)
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def logdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ui", dir="/tmp"))
    Publisher(LogDirTransport(d / "log"), partitions=PARTITIONS).publish(FIRST)
    yield d / "log"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def sidecar(logdir: Path) -> Iterator[SidecarProcess]:
    s = SidecarProcess(logdir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    exe = find_chromium()
    if exe is None:
        pytest.fail(INSTALL_HINT)
    with Browser(exe) as b:
        yield b


@pytest.fixture
def page(chromium: Browser, sidecar: SidecarProcess) -> Iterator[Browser]:
    """The page freshly loaded, at desktop size; afterwards: no dialog, no script error, and
    nothing asked of the server but the page and documented routes."""
    chromium.resize(1280, 900)
    del chromium.dialogs[:], chromium.errors[:], chromium.requests[:]
    chromium.goto(sidecar.url + "/ui")
    chromium.wait_for("document.querySelectorAll('#segments tbody tr').length > 0", what="table")
    yield chromium
    assert chromium.dialogs == []
    assert chromium.errors == []
    for url in chromium.requests:
        if url.startswith("http"):
            assert DOCUMENTED.fullmatch(urlsplit(url).path), url


def _route_pattern(path: str) -> str:
    op = SPEC["paths"][path]["get"]
    out = re.escape(path)
    for param in op.get("parameters", []):
        if param.get("in") == "path":
            values = param["schema"].get("enum")
            part = "|".join(map(re.escape, values)) if values else "[^/]+"
            out = out.replace(re.escape("{" + param["name"] + "}"), f"(?:{part})")
    return out


#: what the browser may ask for: a documented GET route, path parameters filled in
DOCUMENTED = re.compile(
    "|".join(_route_pattern(p) for p in SPEC["paths"] if "get" in SPEC["paths"][p])
)


def _rows(b: Browser) -> list[dict[str, Any]]:
    return b.eval(ROWS)


def _explain(b: Browser, user: str, segment: str, *, enter: bool = False) -> dict[str, str]:
    b.eval("document.getElementById('check-result').hidden = true")
    b.type("#check-user", user)
    b.type("#check-segment", segment)
    if enter:
        b.press_enter()
    else:
        b.click("#check-form button[type=submit]")
    b.wait_for(
        "document.getElementById('check-result').checkVisibility()"
        " || document.getElementById('check-error').checkVisibility()",
        what="an answer",
    )
    return b.eval(
        "Object.fromEntries(['member', 'source', 'version', 'age', 'expires', 'reason', 'all',"
        " 'error']"
        ".map(k => [k, document.getElementById('check-' + k).textContent]))"
    )


# -- the page, in the browser --------------------------------------------------------------------


def test_table_lists_the_published_segments(page: Browser) -> None:
    rows = _rows(page)
    assert [r["segment"] for r in rows] == sorted(FIRST)  # sorted by name at first
    for r in rows:
        assert r["version"] == 1
        assert r["cardinality"] == len(FIRST[r["segment"]])
        assert r["shown"] == f"{len(FIRST[r['segment']]):,}"
        assert r["health"] == "fresh"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", r["updated"])
    page.wait_for("document.getElementById('ready-badge').textContent === 'ready'")
    assert page.eval("document.getElementById('c-segments').textContent") == "3"
    memberships = sum(len(b) for b in FIRST.values())
    assert page.eval("document.getElementById('c-memberships').textContent") == f"{memberships:,}"
    lag = page.eval(
        "[...document.querySelectorAll('#lag tbody tr')].map(tr => [tr.cells[0].textContent,"
        " tr.cells[1].textContent])"
    )
    assert lag == [[str(p), "0"] for p in range(PARTITIONS)]
    assert page.eval("document.getElementById('c-fallback').textContent") == "none"


def test_check_box_answers_true_and_false(page: Browser) -> None:
    yes = _explain(page, "150", "cart:30m")
    assert (yes["member"], yes["source"], yes["version"]) == ("yes", "local", "1")
    assert yes["reason"] == "answered by this replica" and yes["age"] != "–"
    assert yes["all"] == "big.buyers, cart:30m"  # /v1/users/150/segments
    assert yes["error"] == "" and not page.eval(
        "document.getElementById('check-error').checkVisibility()"
    )
    no = _explain(page, "99", "cart:30m", enter=True)
    assert (no["member"], no["source"], no["version"]) == ("no", "local", "1")
    assert no["all"] == "big.buyers"
    # an id above 2**53 goes to the server as typed (a JS number would round it)
    assert _explain(page, str(MAX), "vip")["member"] == "yes"
    assert _explain(page, str(MAX - 1), "vip")["member"] == "no"
    unknown = _explain(page, "1", "never.published")
    assert (unknown["member"], unknown["source"], unknown["reason"]) == (
        "unknown",
        "none",
        "unknown",
    )
    # picking a segment in the table fills the box
    page.click("#segments tbody tr[data-segment='vip'] button")
    assert page.eval("document.getElementById('check-segment').value") == "vip"


def test_bad_input_shows_the_servers_message(page: Browser) -> None:
    got = _explain(page, "-5", "vip")
    assert page.eval("document.getElementById('check-result').checkVisibility()") is False
    assert "user must be a decimal unsigned 64-bit integer" in got["error"]


@pytest.mark.parametrize("field", ["#check-user", "#check-segment", "#filter", "#audience-expr"])
def test_markup_typed_into_a_box_comes_back_as_text(page: Browser, field: str) -> None:
    if field == "#audience-expr":
        got = _audience(page, MARKUP)
        assert got["error"] == "Not counted: bad expression at position 0: unexpected character '<'"
        assert page.eval("document.getElementById('audience-expr').value") == MARKUP
    elif field == "#filter":
        page.type("#filter", MARKUP)
        shown = page.wait_for("document.getElementById('seg-empty').textContent")
        assert shown == f"No segment matches “{MARKUP}”."
    else:
        page.type("#check-user", "1")
        page.type("#check-segment", "vip")
        page.type(field, MARKUP)
        page.click("#check-form button[type=submit]")
        shown = page.wait_for("document.getElementById('check-error').textContent")
        # the server's error message quotes the input (a user id cut at 24 chars): as text
        assert (MARKUP if field == "#check-segment" else MARKUP[:24]) in shown
    time.sleep(0.5)  # an injected image would have failed to load by now
    assert page.eval("document.getElementsByTagName('img').length") == 0
    assert page.eval("document.body.innerHTML.includes('<img')") is False
    assert page.dialogs == []


def test_sort_and_filter(page: Browser) -> None:
    page.click("#segments th button[data-key=cardinality]")  # numbers sort biggest first
    order = [r["segment"] for r in _rows(page)]
    assert order == sorted(FIRST, key=lambda s: -len(FIRST[s]))
    assert page.eval("document.querySelector('#segments th[aria-sort]').textContent") == (
        "cardinality"
    )
    page.click("#segments th button[data-key=cardinality]")
    assert [r["segment"] for r in _rows(page)] == order[::-1]
    page.type("#filter", "VI")  # case-insensitive substring
    assert [r["segment"] for r in _rows(page)] == ["vip"]
    assert page.eval("document.getElementById('seg-count').textContent") == "1 of 3"
    page.type("#filter", "")
    page.eval(
        "(() => { const s = document.getElementById('health-filter'); s.value = 'unhealthy';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    assert _rows(page) == []
    assert page.eval("document.getElementById('seg-empty').checkVisibility()") is True


def test_page_updates_after_a_publish(page: Browser, logdir: Path) -> None:
    page.wait_for("document.getElementById('auto').checked")
    vip = FIRST["vip"] | BitMap64([42, 43])
    Publisher(LogDirTransport(logdir)).publish({"vip": vip, "late": BitMap64([7])})
    PUBLISHED.update(vip=vip, late=BitMap64([7]))
    page.wait_for(
        "document.querySelector('#segments tbody tr[data-segment=late]') !== null",
        what="the new segment in the table",
    )
    rows = {r["segment"]: r for r in _rows(page)}
    assert (rows["vip"]["version"], rows["vip"]["cardinality"]) == (2, len(vip))
    assert (rows["late"]["version"], rows["late"]["cardinality"]) == (1, 1)
    assert rows["cart:30m"]["version"] == 1
    page.wait_for("document.getElementById('c-segments').textContent === '4'")
    assert _explain(page, "42", "vip")["version"] == "2"
    # request rates come from /v1/status: the explains just made are counted
    page.wait_for(
        "[...document.querySelectorAll('#rates tbody tr')].some(tr =>"
        " tr.cells[1].textContent === 'explain' && Number(tr.cells[3].dataset.value) >= 1)",
        what="explain in the request table",
    )


def test_ttl_segments_are_flagged_expiring(page: Browser, logdir: Path) -> None:
    """A TTL segment (ttl_seconds) shows an "expiring" badge with its next expiry, the
    "expiring" filter shows only TTL segments, and the check box shows a member's expiry."""
    page.wait_for("document.getElementById('auto').checked")
    members = BitMap64([5, 6])
    Publisher(LogDirTransport(logdir)).publish({"soon": members}, ttl={"soon": 3600})
    PUBLISHED.update(soon=members)
    page.wait_for(
        "document.querySelector('#segments tbody tr[data-segment=soon]') !== null",
        what="the TTL segment in the table",
    )
    badges = page.eval(
        "Object.fromEntries([...document.querySelectorAll('#segments tbody tr')].map(tr =>"
        " [tr.dataset.segment, [...tr.cells[4].querySelectorAll('.badge.ttl')]"
        ".map(b => [b.textContent, b.title])]))"
    )
    assert [text for text, _ in badges["soon"]] == ["expiring"]
    assert re.search(r"next expiry in (59|60) min \(\d{4}-\d\d-\d\dT", badges["soon"][0][1])
    assert all(not v for k, v in badges.items() if k != "soon")  # plain segments: no badge
    page.eval(
        "(() => { const s = document.getElementById('health-filter'); s.value = 'expiring';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    assert [r["segment"] for r in _rows(page)] == ["soon"]
    got = _explain(page, "5", "soon")
    assert got["member"] == "yes"
    at = page.eval("Number(document.getElementById('check-expires').dataset.expiresAt)")
    assert at % 1000 == 0 and at > time.time() * 1000 + 3_500_000
    assert re.fullmatch(r"in (59|60) min \(\d{4}-\d\d-\d\dT[\d:.]+Z\)", got["expires"])
    assert _explain(page, "5", "vip")["expires"] == "–"  # a plain segment's member


def _audience(b: Browser, expr: str) -> dict[str, Any]:
    b.type("#audience-expr", expr)
    b.click("#audience-form button[type=submit]")
    b.wait_for(
        "document.getElementById('audience-result').checkVisibility()"
        " || document.getElementById('audience-error').checkVisibility()",
        what="the audience",
    )
    return b.eval(
        "({count: document.getElementById('audience-count').textContent,"
        " versions: document.getElementById('audience-versions').textContent,"
        " ids: [...document.querySelectorAll('#audience-ids li')].map(li => li.textContent),"
        " shown: document.getElementById('audience-result').checkVisibility(),"
        " error: document.getElementById('audience-error').textContent})"
    )


def test_audience_box(page: Browser) -> None:
    # the box shows because openapi.json documents the routes (it hides on a sidecar without)
    assert {"/v1/audience/count", "/v1/audience"} <= set(SPEC["paths"])
    page.wait_for("document.getElementById('audience-panel').checkVisibility()")
    got = _audience(page, "cart:30m & !vip")
    assert got["shown"] and got["error"] == ""
    assert got["count"] == "100" and got["ids"] == [str(u) for u in range(100, 120)]
    assert page.eval("document.getElementById('audience-more').textContent") == "and 80 more"
    assert got["versions"].startswith("cart:30m v1, vip v")
    union = PUBLISHED["vip"] | PUBLISHED["big.buyers"]
    got = _audience(page, "vip | big.buyers")
    assert got["count"] == f"{len(union):,}"
    assert got["ids"] == [str(u) for u in list(union)[:20]]
    got = _audience(page, "never.published & vip")  # 409: not held here
    assert not got["shown"] and "never.published" in got["error"]
    got = _audience(page, "!vip")  # 400: unbounded
    assert not got["shown"] and "unbounded" in got["error"]


def test_fallback_answers_and_the_breaker(
    chromium: Browser, aerospike_server: ThreadedAerospikeServer, tmp_path: Path
) -> None:
    log = LogDirTransport(tmp_path / "log")
    publish_mirrored(log, aerospike_server, {"held": BitMap64([5]), "remote": BitMap64([5, 6])})
    s = SidecarProcess(
        log.path, "--segments", "held", "--aerospike", aerospike_server.address,
        "--fallback-budget-ms", "300",
    )  # fmt: skip
    del chromium.dialogs[:], chromium.errors[:]
    try:
        chromium.goto(s.url + "/ui")
        breaker = "document.getElementById('c-breaker').dataset.state"
        chromium.wait_for(f"{breaker} === 'closed'", what="the breaker closed")
        assert chromium.eval("document.getElementById('c-fallback').textContent") == "aerospike"
        deadline = time.monotonic() + 15  # the fallback connects in the background
        while (got := _explain(chromium, "6", "remote"))["source"] != "aerospike":
            assert time.monotonic() < deadline, got
        assert (got["member"], got["version"], got["reason"]) == ("yes", "1", "not_held")
        assert _explain(chromium, "7", "remote")["member"] == "no"
        aerospike_server.down()
        try:
            deadline = time.monotonic() + 60
            while json.loads(_get(s.url + "/v1/status")[2])["fallback"]["breaker"] != "open":
                assert time.monotonic() < deadline, "the breaker never opened"
                _get(s.url + "/v1/check?user=6&segment=remote")  # failures open the breaker
            chromium.wait_for(f"{breaker} === 'open'", what="the breaker open")
            shown = chromium.eval("document.getElementById('c-breaker').textContent")
            assert shown.startswith("breaker open")
            got = _explain(chromium, "6", "remote")
            assert (got["member"], got["source"]) == ("unknown", "none")
        finally:
            aerospike_server.up()
        assert chromium.dialogs == [] and chromium.errors == []
    finally:
        s.stop()


def test_not_ready_then_unreachable(chromium: Browser, tmp_path: Path) -> None:
    s = SidecarProcess(tmp_path / "no-log-yet", ready=False)  # waits for the log to appear
    try:
        chromium.goto(s.url + "/ui")
        chromium.wait_for("document.getElementById('ready-badge').textContent === 'not ready'")
        assert chromium.eval("document.getElementById('c-ready').textContent") == "catching up"
        got = _explain(chromium, "1", "vip")
        assert (got["member"], got["source"], got["reason"]) == ("unknown", "none", "not_ready")
    finally:
        s.stop()
    chromium.wait_for(
        "document.getElementById('ready-badge').textContent === 'unreachable'"
        " && document.getElementById('problem').checkVisibility()",
        what="the page saying the sidecar is gone",
    )
    assert chromium.eval("document.getElementById('problem').textContent").startswith(
        "Cannot read the sidecar"
    )


def test_narrow_screen(page: Browser) -> None:
    page.resize(375, 800, mobile=True)
    page.goto(page.eval("location.href"))
    page.wait_for("document.querySelectorAll('#segments tbody tr').length > 0")
    # the page itself never scrolls sideways (wide tables scroll inside their own box)
    assert page.eval("document.documentElement.scrollWidth") <= 375
    width = page.eval("document.getElementById('check-form').getBoundingClientRect().width")
    assert 0 < width <= 375


def test_screenshot(page: Browser, tmp_path: Path) -> None:
    _explain(page, "150", "cart:30m")
    _audience(page, "cart:30m & !vip")
    # rates need two readings of the counts: wait for the second refresh
    page.wait_for(
        "[...document.getElementById('rates').tBodies[0].rows].some(r =>"
        " r.cells[2].textContent !== '–')",
        what="a request rate",
    )
    page.eval("window.scrollTo(0, 0)")
    target = Path(os.environ.get("SEG_UI_SCREENSHOT") or tmp_path / "ui.png")
    page.screenshot(target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the server side, without a browser -----------------------------------------------------------


def test_page_and_assets_are_served_with_a_strict_policy(sidecar: SidecarProcess) -> None:
    status, headers, body = _get(sidecar.url + "/ui")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert body == (UI_DIR / "index.html").read_bytes()
    for name in ("console.js", "console.css"):
        status, headers, body = _get(f"{sidecar.url}/ui/{name}")
        assert status == 200 and body == (UI_DIR / name).read_bytes()
    for bad in ("index.html", "..%2Fhttp.py", "nope.js"):
        status, _, body = _get(f"{sidecar.url}/ui/{bad}")
        assert status == 404 and "error" in json.loads(body)


def test_the_script_never_writes_markup_and_calls_only_documented_routes() -> None:
    js = re.sub(r"^\s*//.*$", "", (UI_DIR / "console.js").read_text(), flags=re.M)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js
    called = {"/" + c for c in re.findall(r"call\([`\"]([a-z0-9/._]+)", js)}
    # the audience box asks its routes only once openapi.json lists them (the page fixture
    # checks every request the browser made)
    gated = {"/v1/audience", "/v1/audience/count"}
    assert {"/v1/status", "/v1/segments", "/v1/explain", "/v1/users/"} <= called
    assert called - gated - {"/v1/users/"} <= set(SPEC["paths"]), called
    assert "/v1/users/{user}/segments" in SPEC["paths"]
    # and the pattern the page fixture checks the browser's requests with is not a blank cheque
    assert DOCUMENTED.fullmatch("/v1/users/150/segments") and DOCUMENTED.fullmatch("/ui/console.js")
    for stray in ("/ui/x.js", "/v1/users/1/segments/x", "/favicon.ico", "/v1/audience/count"):
        assert not DOCUMENTED.fullmatch(stray) or stray in SPEC["paths"]


@pytest.mark.parametrize(("args", "env"), [(["--no-ui"], {}), ([], {"SEG_NO_UI": "1"})])
def test_no_ui_turns_the_page_off(logdir: Path, args: list[str], env: dict[str, str]) -> None:
    s = SidecarProcess(logdir, *args, env=env)
    try:
        assert _get(s.url + "/ui")[0] == 404
        assert _get(s.url + "/ui/console.js")[0] == 404
        assert _get(s.url + "/v1/segments")[0] == 200
    finally:
        s.stop()
