"""The annotation server over real HTTP on loopback: bad input gets a 4xx and writes nothing, tokens see only their
own work, the model identities never reach an annotator, twenty annotators voting at once lose nothing, and a
server killed with SIGKILL mid-study keeps every vote it acknowledged."""

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from pipeline.config import build
from pipeline.human.study import StudyConfig, create_study, open_study

from human_app import Server, request, tokens, vote



@pytest.fixture()
def served(rendered_study):
    folder, store = rendered_study
    server = Server(folder)
    yield folder, store, server
    server.stop()


def test_bad_requests_get_4xx_and_write_nothing(served):
    folder, store, server = served
    people = tokens(folder)
    a1, a2 = people["g1-a1"], people["g2-a1"]
    status, nxt = request(f"{server.base}/annotate/{a1}/next")
    assert status == 200 and nxt["progress"] == {"done": 0, "total": 6}
    item = nxt["item"]
    json_h = {"Content-Type": "application/json"}
    cases = [
        (request(f"{server.base}/annotate/not-a-token/next"), 404, "unknown annotator"),
        (vote(server.base, "not-a-token", item, "left"), 404, "unknown annotator"),
        (vote(server.base, a1, "no-such-item", "left"), 404, "no item"),
        (vote(server.base, a1, item, "A"), 400, "expected one of"),  # systems are not a screen choice
        (request(f"{server.base}/annotate/{a1}/vote", body=b"{not json", headers=json_h), 400, "not valid JSON"),
        (request(f"{server.base}/annotate/{a1}/vote", body=b'["left"]', headers=json_h), 400, "exactly"),
        (request(f"{server.base}/annotate/{a1}/vote", body=json.dumps({"item": item, "choice": "left", "x": 1}).encode(),
                 headers=json_h), 400, "exactly"),
        (request(f"{server.base}/annotate/{a1}/vote", body=json.dumps({"item": item, "choice": "left"}).encode(),
                 headers={"Content-Type": "text/plain"}), 415, "application/json"),
        (request(f"{server.base}/annotate/{a1}/vote", body=b'{"item": "' + b"x" * 5000 + b'", "choice": "left"}',
                 headers=json_h), 413, "over 1024 bytes"),
        (request(f"{server.base}/annotate/{a1}/vote", method="GET"), 405, ""),
        (request(f"{server.base}/annotate/{a1}/image/not-a-key"), 404, "no image"),
        (request(f"{server.base}/static/../store.py"), 404, ""),
    ]
    for (status, body), expected, words in cases:
        assert status == expected, (expected, status, body)
        assert isinstance(body, dict) and words in body["error"], body
    assert store.votes() == []
    assert vote(server.base, a1, item, "left")[0] == 200
    status, body = vote(server.base, a1, item, "right")  # a second vote on the same item
    assert status == 409 and "cannot be changed" in body["error"]
    status, body = vote(server.base, a1, item, "left")
    assert status == 409
    assert [(v["annotator"], v["side"]) for v in store.votes()] == [("g1-a1", "left")]
    # the other annotator's progress is untouched and its next item is its own group's first
    status, nxt2 = request(f"{server.base}/annotate/{a2}/next")
    assert nxt2["progress"] == {"done": 0, "total": 6}


def test_admin_routes_need_the_admin_token(served):
    folder, _, server = served
    admin = (folder / "admin_token.txt").read_text().strip()
    annotator = next(iter(tokens(folder).values()))
    assert request(f"{server.base}/admin/results")[0] == 401
    assert request(f"{server.base}/admin/results", headers={"Authorization": f"Bearer {annotator}"})[0] == 403
    assert request(f"{server.base}/admin/status", headers={"Authorization": "Bearer wrong"})[0] == 403
    status, body = request(f"{server.base}/admin/results", headers={"Authorization": f"Bearer {admin}"})
    assert status == 200 and body["systems"]["A"]["name"] == "dataset winner" and body["num_items"] == 6
    status, body = request(f"{server.base}/admin/status", headers={"Authorization": f"Bearer {admin}"})
    assert status == 200 and len(body["annotators"]) == 12 and "token" not in json.dumps(body["annotators"])


def test_annotators_never_see_which_system_made_which_image(served):
    folder, store, server = served
    people = tokens(folder)
    names = [s["name"] for s in json.loads((folder / "study.json").read_text())["systems"].values()]
    by_key = {}
    for item in store.items():
        by_key[item["image_a"]], by_key[item["image_b"]] = "A", "B"
    token = people["g3-a2"]
    page = request(f"{server.base}/annotate/{token}")[1] + request(f"{server.base}/static/annotate.js")[1]
    lefts = []
    for _ in range(6):
        status, nxt = request(f"{server.base}/annotate/{token}/next")
        assert set(nxt) == {"item", "prompt", "left", "right", "progress", "study"}
        text = json.dumps(nxt) + page.decode()
        assert not any(n in text for n in names) and "winner" not in text and "loser" not in text
        keys = [nxt[side].rsplit("/", 1)[1] for side in ("left", "right")]
        assert sorted(by_key[k] for k in keys) == ["A", "B"]  # one of each, keys random
        for url in (nxt["left"], nxt["right"]):
            status, png = request(server.base + url)
            assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n" and b"tEXt" not in png and b"iTXt" not in png
        lefts.append(by_key[keys[0]])
        assert vote(server.base, token, nxt["item"], "tie")[0] == 200
    assert request(f"{server.base}/annotate/{token}/next")[1]["item"] is None
    # sides are drawn per item: over a study, system A is not always on the same side
    assert len(set(lefts)) == 2


def test_server_binds_loopback_by_default(served):
    _, _, server = served
    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_twenty_annotators_voting_at_once_lose_nothing(tmp_path):
    from conftest import write_rendered_pairs

    pairs = write_rendered_pairs(tmp_path / "pairs")
    cfg = build(StudyConfig, {"name": "busy", "source": "pairs", "pairs": str(pairs), "groups": 5,
                              "annotators_per_group": 4})
    create_study(cfg, tmp_path / "study")
    people = tokens(tmp_path / "study")
    assert len(people) == 20
    server = Server(tmp_path / "study")
    try:
        barrier = threading.Barrier(len(people))
        sent: dict[tuple[str, str], str] = {}

        def annotate(name: str, token: str) -> list[int]:
            statuses = []
            barrier.wait()
            for k in range(6):
                nxt = request(f"{server.base}/annotate/{token}/next")[1]
                choice = ("left", "right", "tie")[(k + len(name)) % 3]
                status, _ = vote(server.base, token, nxt["item"], choice)
                statuses.append(status)
                sent[(name, nxt["item"])] = choice
            return statuses

        with ThreadPoolExecutor(len(people)) as pool:
            results = list(pool.map(lambda kv: annotate(*kv), people.items()))
        assert all(s == 200 for r in results for s in r), results
    finally:
        server.stop()
    stored = {(v["annotator"], v["item"]): v["side"] for v in open_study(tmp_path / "study").votes()}
    assert stored == sent and len(stored) == 120


def test_sigkill_keeps_every_acknowledged_vote(rendered_study):
    folder, store = rendered_study
    people = tokens(folder)
    server = Server(folder)
    acked: set[tuple[str, str]] = set()
    stop = threading.Event()

    def annotate(name: str, token: str) -> None:
        while not stop.is_set():
            try:
                nxt = request(f"{server.base}/annotate/{token}/next")[1]
                if nxt["item"] is None:
                    return
                status, _ = vote(server.base, token, nxt["item"], "left")
            except OSError:  # the server is gone: this vote was never acknowledged
                return
            if status == 200:
                acked.add((name, nxt["item"]))

    threads = [threading.Thread(target=annotate, args=kv) for kv in people.items()]
    for t in threads:
        t.start()
    deadline = time.time() + 60
    while len(acked) < 20 and time.time() < deadline:
        time.sleep(0.01)
    os.kill(server.proc.pid, signal.SIGKILL)  # mid-study: threads are posting
    server.proc.wait()
    stop.set()
    for t in threads:
        t.join(60)
    assert 20 <= len(acked) < 72, len(acked)

    restarted = Server(folder)
    try:
        stored = [(v["annotator"], v["item"]) for v in open_study(folder).votes()]
        assert len(stored) == len(set(stored))  # no duplicates
        assert acked <= set(stored)  # every acknowledged vote survived
        name, item = sorted(acked)[0]
        assert vote(restarted.base, people[name], item, "right")[0] == 409  # and still counts as given
        status, nxt = request(f"{restarted.base}/annotate/{people[name]}/next")
        done = sum(1 for a, _ in stored if a == name)
        assert nxt["progress"]["done"] == done and nxt["item"] not in {i for a, i in stored if a == name}
    finally:
        restarted.stop()
