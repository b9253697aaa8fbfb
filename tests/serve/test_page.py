"""The results page in a real browser: Debian's chromium driven by Playwright, against genret serve on loopback.

Every wait is a Playwright locator or a Python poll: the page's Content-Security-Policy forbids eval, which
``page.wait_for_function`` with a string needs."""

import shutil
import urllib.parse

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from genret.serve.app import ServeConfig, create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (./run test installs it: apt-get install chromium)")
expect = sync_api.expect
KEY = "page-test-key-0123456789"
# Each tries to run script where the page writes data: as HTML, as an attribute, as a URL.
PAYLOADS = ['"><img src=x onerror="window.__xss=1">', "<script>window.__xss=2</script>",
            "<svg/onload=window.__xss=3>", "javascript:window.__xss=4", "' onmouseover='window.__xss=5' x='"]
CAPTIONS = ["</div><img src=x onerror=window.__xss=6>", "<b>bold?</b><script>window.__xss=7</script>",
            "a red circle &amp; <i>square</i>", "<iframe src=javascript:window.__xss=8>", "${window.__xss=9}"]


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


def watch(page) -> dict:
    """Dialogs opened and Content-Security-Policy reports of ``page``, as they happen."""
    seen = {"dialogs": [], "csp": []}
    page.on("dialog", lambda d: (seen["dialogs"].append(d.message), d.dismiss()))
    page.on("console", lambda m: "Content Security Policy" in m.text and seen["csp"].append(m.text))
    return seen


def test_page_asks_for_the_key_and_shows_results_with_per_stage_scores(served_pipe, world, loopback, tmp_path, browser):
    caption = world.split("test").records[0].captions[0]
    with loopback(create_app(served_pipe, ServeConfig(api_key=KEY))) as server:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        seen = watch(page)
        page.goto(f"{server.url}/?" + urllib.parse.urlencode({"q": caption, "k": 4}))
        expect(page.locator("#error")).to_contain_text("API key", timeout=30_000)  # the page loads; the search needs it
        page.fill("#key", KEY)
        page.click("#go")
        expect(page.locator(".result")).to_have_count(4, timeout=30_000)
        cards = page.locator(".result")
        for i in range(4):  # every result: a thumbnail fetched with the key, loaded, and a bar per stage
            card = cards.nth(i)
            img = card.locator("img")
            assert img.get_attribute("src").startswith("blob:")
            expect(img).to_have_js_property("complete", True)
            assert img.evaluate("img => img.naturalWidth") > 0
            assert sorted(card.locator(".bar").evaluate_all("bs => bs.map(b => b.dataset.stage)")) == ["prefilter", "rerank"]
        assert "prefilter" in page.inner_text("#timings") and "rerank" in page.inner_text("#timings")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        from PIL import Image, ImageStat

        with Image.open(shot) as img:
            assert img.size[0] == 1100 and max(ImageStat.Stat(img.convert("L")).stddev) > 10  # not blank
        assert urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)["q"] == [caption]
        assert KEY not in page.url  # the key stays in the tab's session storage, out of the URL and history
        assert page.evaluate("() => sessionStorage.getItem('genret-api-key')") == KEY
        # "search with this image" on the first result: the page now ranks captions for that image.
        page.locator(".result button").first.click()
        expect(page.locator(".result .text")).to_have_count(4, timeout=30_000)
        # A bad query says what to fix on the page.
        page.fill("#k", "0")
        page.click("#go")
        expect(page.locator("#error")).to_contain_text("k must be between", timeout=10_000)
        assert seen["csp"] == [] and seen["dialogs"] == []  # the page keeps to its own policy


def test_data_that_looks_like_html_is_shown_as_text(world, make_pipe, loopback, browser, tmp_path):
    """Item ids and captions that are script payloads: shown literally, and no script of theirs runs."""
    records = world.split("test").records[:5]
    images = {}
    for payload, rec in zip(PAYLOADS, records):
        copy = tmp_path / f"{len(images)}.png"
        shutil.copy(rec.path, copy)
        images[payload] = copy
    pipe = make_pipe(images=images, texts={f"{p}#caption": c for p, c in zip(PAYLOADS, CAPTIONS)})
    with loopback(create_app(pipe)) as server:
        page = browser.new_page()
        seen = watch(page)
        page.goto(f"{server.url}/?" + urllib.parse.urlencode({"q": "a red circle", "k": 5}))
        expect(page.locator(".result")).to_have_count(5, timeout=30_000)
        assert sorted(page.locator(".result .id").all_inner_texts()) == sorted(PAYLOADS)
        for img in page.locator(".result img").all():  # every thumbnail found under its quoted id
            expect(img).to_have_js_property("complete", True)
            assert img.evaluate("img => img.naturalWidth") > 0
        page.locator(".result img").first.hover()
        page.locator(".result button").first.click()  # its captions
        expect(page.locator(".result .text")).to_have_count(5, timeout=30_000)
        assert sorted(page.locator(".result .text").all_inner_texts()) == sorted(CAPTIONS)
        assert page.locator("#grid img[src='x'], #grid script, #grid svg, #grid iframe, #grid b, #grid i").count() == 0
        assert page.evaluate("() => window.__xss") is None
        assert seen["dialogs"] == []


def test_the_policy_blocks_inline_script(served_pipe, loopback, browser):
    """Script put into the page some other way (inline, or a handler attribute) does not run under its policy; the
    same page without the policy runs it (so the check could fail)."""
    inject = """() => {
        const s = document.createElement("script");
        s.textContent = "window.__inline = 1";
        document.body.append(s);
        document.body.insertAdjacentHTML("beforeend", '<img src="data:," onerror="window.__handler = 1">');
        return new Promise((ok) => setTimeout(() => ok([window.__inline || null, window.__handler || null]), 300));
    }"""
    with loopback(create_app(served_pipe)) as server:
        page = browser.new_page()
        response = page.goto(server.url + "/")
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert page.evaluate(inject) == [None, None]
        unguarded = browser.new_context(bypass_csp=True).new_page()
        unguarded.goto(server.url + "/")
        assert unguarded.evaluate(inject) == [1, 1]
