"""The results page in a real browser: Debian's chromium driven by Playwright, against genret serve on loopback."""

import shutil
import urllib.parse

import pytest

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from genret.serve.app import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium here (./run test installs it: apt-get install chromium)")


def test_page_shows_results_with_per_stage_scores(served_pipe, world, loopback, tmp_path):
    caption = world.split("test").records[0].captions[0]
    with loopback(create_app(served_pipe)) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.goto(f"{server.url}/?" + urllib.parse.urlencode({"q": caption, "k": 4}))
            page.wait_for_selector(".result", timeout=30_000)
            cards = page.locator(".result")
            assert cards.count() == 4
            for i in range(4):  # every result: a thumbnail that loaded, and a bar per stage
                card = cards.nth(i)
                assert card.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
                assert sorted(card.locator(".bar").evaluate_all("bs => bs.map(b => b.dataset.stage)")) == ["prefilter", "rerank"]
            assert "prefilter" in page.inner_text("#timings") and "rerank" in page.inner_text("#timings")
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            from PIL import Image, ImageStat

            with Image.open(shot) as img:
                assert img.size[0] == 1100 and max(ImageStat.Stat(img.convert("L")).stddev) > 10  # not blank
            assert urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)["q"] == [caption]
            # "search with this image" on the first result: the page now ranks captions for that image.
            page.locator(".result button").first.click()
            page.wait_for_selector(".result .text", timeout=30_000)
            assert page.locator(".result .text").count() == 4
            # A bad query says what to fix on the page.
            page.fill("#k", "0")
            page.click("#go")
            page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=10_000)
            assert "k must be between" in page.inner_text("#error")
        finally:
            browser.close()
