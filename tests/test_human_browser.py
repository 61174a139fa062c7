"""The annotation app in a real browser (Debian's Chromium, headless, driven by Selenium): one annotator answers a
whole study by buttons and keyboard shortcuts, reloads midway and resumes at the next unanswered item, ends on
"All done"; the store holds exactly the sides clicked; nothing the browser receives names a system.

Needs /usr/bin/chromium and /usr/bin/chromedriver (``apt-get install chromium chromium-driver``); without them the
test is skipped, unless ``PIPELINE_REQUIRE_BROWSER=1`` (CI) makes that a failure. Set ``HUMAN_EVAL_SCREENSHOT=PATH``
to also save the mid-study screenshot there (docs/human_eval_app.png).
"""

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from human_app import Server, free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 30  # the CI machine may be busy: generous explicit waits, never sleeps
KEY = re.compile(r"[A-Za-z0-9_-]{24}")  # store.new_key(): secrets.token_urlsafe(18)


def _require_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.is_file() and os.access(p, os.X_OK))]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        message = (f"browser test needs {', '.join(missing)}: install Debian's packages with "
                   f"`apt-get install chromium chromium-driver`")
        if os.environ.get("PIPELINE_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (PIPELINE_REQUIRE_BROWSER=1: a missing browser is a failure)", pytrace=False)
        pytest.skip(message)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,780",
                "--disable-extensions", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)  # a given path: no Selenium Manager


def _links(study: Path, port: int) -> list[str]:
    """Annotator links in links.md's order (g1-a1 first), pointed at this test's port."""
    tokens = re.findall(r"http://127\.0\.0\.1:8000/annotate/([A-Za-z0-9_-]+)", (study / "links.md").read_text())
    return [f"http://127.0.0.1:{port}/annotate/{t}" for t in tokens]


def _assert_blind(text: str, forbidden: list[str], where: str) -> None:
    low = text.lower()
    for word in forbidden:
        assert word not in low, f"{where} contains {word!r}: the page must not say which system is which"


@pytest.mark.timeout(600)
def test_annotation_app_in_a_real_browser(rendered_study, tmp_path):
    _require_browser()
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline.human.store import side_to_choice
    from pipeline.human.study import open_study

    folder, _ = rendered_study
    meta = json.loads((folder / "study.json").read_text())
    forbidden = ["winner", "loser"] + [s["name"].lower() for s in meta["systems"].values()]
    port = free_port()
    links = _links(folder, port)
    assert len(links) == 12
    link, other_link = links[0], links[4]  # g1-a1, and g2-a1 (another group)
    token = link.rsplit("/", 1)[1]
    total = meta["num_items"]
    assert total == 6

    server = Server(folder, port)
    driver = None
    try:
        driver = _browser()
        wait = WebDriverWait(driver, WAIT_S)

        def text(element_id: str) -> str:
            return driver.find_element(By.ID, element_id).text

        def wait_progress(done: int) -> None:
            try:
                wait.until(lambda d: text("progress-text") == f"{done} / {total}")
            except TimeoutException:
                raise AssertionError(f"progress stayed at {text('progress-text')!r}, expected '{done} / {total}'; "
                                     f"error shown: {text('error')!r}") from None

        def wait_images() -> None:
            wait.until(lambda d: d.execute_script(
                "const i = [document.getElementById('left'), document.getElementById('right')];"
                "return i.every(x => x.getAttribute('src') && x.complete && x.naturalWidth > 0);"))

        def shown() -> dict:
            """What the page shows now, checked against /next (same state: GET changes nothing)."""
            status, body = _get(link + "/next")
            assert status == 200, body
            _assert_blind(body.decode(), forbidden, "the /next JSON")
            nxt = json.loads(body)
            assert set(nxt) == {"item", "prompt", "left", "right", "progress", "study"}, nxt
            wait_images()
            page = {"prompt": text("prompt"),
                    "left": urlparse(driver.find_element(By.ID, "left").get_attribute("src")).path,
                    "right": urlparse(driver.find_element(By.ID, "right").get_attribute("src")).path}
            assert page == {k: nxt[k] for k in ("prompt", "left", "right")}, (page, nxt)
            assert nxt["progress"] == {"done": len(steps), "total": total}
            _assert_blind(driver.page_source, forbidden, "the page's HTML")
            for side in ("left", "right"):
                url = nxt[side]
                _assert_blind(url, forbidden, "an image URL")
                prefix, key = url.rsplit("/", 1)
                assert prefix == f"/annotate/{token}/image" and KEY.fullmatch(key), url
                status, png = _get(f"http://127.0.0.1:{port}{url}")
                assert status == 200 and png.startswith(b"\x89PNG"), (status, png[:40])
                _assert_blind(png.decode("latin-1"), forbidden, "an image's bytes")
            assert driver.find_element(By.ID, "task").is_displayed()
            assert not driver.find_element(By.ID, "done").is_displayed()
            assert not driver.find_element(By.ID, "error").is_displayed(), text("error")
            return {"item": nxt["item"], "prompt": nxt["prompt"], "left": nxt["left"].rsplit("/", 1)[1],
                    "right": nxt["right"].rsplit("/", 1)[1]}

        # The plan: buttons and keyboard shortcuts, every side; reload after 3 votes, a new window after 5.
        plan = [("click", "vote-left", "left"), ("key", "b", "right"), ("click", "vote-tie", "tie"),
                ("click", "vote-right", "right"), ("key", "t", "tie"), ("key", "a", "left")]
        steps: list[dict] = []

        driver.get(link)
        wait_progress(0)
        _assert_blind(driver.page_source, forbidden, "the page's HTML")
        for name in ("annotate.js", "annotate.css"):
            status, body = _get(f"http://127.0.0.1:{port}/static/{name}")
            assert status == 200
            _assert_blind(body.decode(), forbidden, name)

        for k, (how, what, side) in enumerate(plan):
            if k == 3:  # reload: the page resumes at the first unanswered item
                driver.refresh()
                wait_progress(3)
            if k == 4:  # same again in a fresh window, then answer there
                driver.save_screenshot(str(tmp_path / "human_eval_app.png"))
                if os.environ.get("HUMAN_EVAL_SCREENSHOT"):
                    target = Path(os.environ["HUMAN_EVAL_SCREENSHOT"])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    driver.save_screenshot(str(target))
            if k == 5:
                driver.switch_to.new_window("window")
                driver.get(link)
                wait_progress(5)
            step = shown()
            assert step["item"] not in {s["item"] for s in steps}, f"item repeated at step {k}: {step}"
            steps.append({**step, "side": side, "how": how})
            if how == "click":
                driver.find_element(By.ID, what).click()
            else:
                ActionChains(driver).send_keys(what).perform()
            wait_progress(k + 1)

        # The end: "All done", no task, and the server agrees.
        wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
        assert "All done" in text("done")
        assert not driver.find_element(By.ID, "task").is_displayed()
        assert not driver.find_element(By.ID, "error").is_displayed(), text("error")
        status, body = _get(link + "/next")
        assert status == 200 and json.loads(body) == {"item": None, "progress": {"done": total, "total": total},
                                                       "study": meta["name"]}
        _assert_blind(driver.page_source, forbidden, "the page's HTML")

        # No script error, no blocked resource (CSP) in either window; a missing favicon is fine.
        logs = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]
        assert not logs, logs

        # Image access is scoped to the link: a made-up token or key is a 404. Keys are per sample, not per
        # annotator, and every annotator is assigned every item (each group answers the whole study), so another
        # annotator's own link opens the same keys: 200 exactly for the items assigned to them, else 404.
        other_token = other_link.rsplit("/", 1)[1]
        assigned = open_study(folder).assignments()
        other_items = {a["item"] for a in assigned if a["annotator"] == "g2-a1"}
        for s in steps:
            for side in ("left", "right"):
                assert _get(f"http://127.0.0.1:{port}/annotate/{token[::-1]}/image/{s[side]}")[0] == 404
                assert _get(f"http://127.0.0.1:{port}/annotate/{other_token}/image/{s[side]}")[0] == (
                    200 if s["item"] in other_items else 404)
        assert _get(f"http://127.0.0.1:{port}/annotate/{other_token}/image/{'x' * 24}")[0] == 404
        status, body = _get(other_link + "/next")
        assert status == 200 and json.loads(body)["progress"] == {"done": 0, "total": total}
    finally:
        try:
            if driver is not None:
                driver.quit()
        finally:
            server.stop()

    # Every item once, in the annotator's order; every image key distinct.
    store = open_study(folder)
    mine = [a for a in store.assignments() if a["annotator"] == "g1-a1"]
    assert [s["item"] for s in steps] == [a["item"] for a in sorted(mine, key=lambda a: a["position"])]
    image_keys = [s[side] for s in steps for side in ("left", "right")]
    assert len(set(image_keys)) == 2 * total

    # Admin side: the two keys shown are that item's two systems, on the sides the assignment says.
    items = {i["item_key"]: i for i in store.items()}
    a_on_left = {a["item"]: bool(a["a_on_left"]) for a in mine}
    for s in steps:
        item = items[s["item"]]
        assert {s["left"], s["right"]} == {item["image_a"], item["image_b"]}
        assert item["image_a"] != item["image_b"]
        assert (s["left"] == item["image_a"]) == a_on_left[s["item"]]

    # Exactly the six votes clicked, all annotator 1's, each with the side clicked and the system it means.
    votes = store.votes()
    assert {v["annotator"] for v in votes} == {"g1-a1"}
    assert len(votes) == total
    by_item = {v["item"]: v for v in votes}
    assert len(by_item) == total
    for s in steps:
        v = by_item[s["item"]]
        assert v["side"] == s["side"], (s, v)
        assert v["choice"] == side_to_choice(s["side"], a_on_left[s["item"]])
    assert [v["item"] for v in votes] == [s["item"] for s in steps]  # stored in the order answered
