"""Benchmark: the labeling app's latency against a no-op Gradio app with the same login, in one run.

    python bench/app_latency.py [--votes 100000] [--calls 40] [--rounds 2]

Both apps run as their own server processes on 127.0.0.1, one at a time, alternating for
`--rounds`. The database is seeded with 10k items and 100k votes (bench/export.py). Each app is
driven by 1 and then by 16 concurrent `gradio_client` annotators. Each annotator calls "vote"
(record an answer, get the next comparison) and "next" (`/load`: a fresh comparison) `--calls`
times each. The no-op app has the same auth function (scrypt check against the annotator table),
the same concurrency limit and endpoints of the same names, and returns constants. Prints p50/p95
per endpoint, throughput at 16 annotators, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotate.users import add_user  # noqa: E402
from bench.export import seed  # noqa: E402
from db import open_db  # noqa: E402
from tests.server import AppServer  # noqa: E402

N_USERS = 16
NOOP_APP = textwrap.dedent('''
    import sys
    import gradio as gr
    from annotate.auth import authenticate
    from db import open_db

    _, factory = open_db(sys.argv[1])

    def check(username, password):
        with factory() as s:
            return authenticate(s, username, password) is not None

    def load(show_diff, request: gr.Request):
        return "token", "### header", "progress", "<table></table>"

    def vote(token, s, g, c, st, f, r, d, request: gr.Request):
        return "token", "### header", "progress", "<table></table>"

    with gr.Blocks() as demo:
        t, h, p, v = gr.Textbox(), gr.Markdown(), gr.HTML(), gr.HTML()
        ins = [gr.Textbox(), gr.Radio(["x"]), *[gr.Radio(["x"]) for _ in range(4)], gr.Textbox(), gr.Checkbox()]
        diff = gr.Checkbox()
        demo.load(load, [diff], [t, h, p, v], api_name="load")
        gr.Button().click(vote, ins, [t, h, p, v], api_name="vote_left")
    demo.queue(default_concurrency_limit=16)
    demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[2]), auth=check)
''')


class NoopServer(AppServer):
    def __init__(self, db_url: str, log: Path, script: Path):
        super().__init__(db_url, log)
        self.script = script

    def start(self, timeout: float = 90):
        import os
        import urllib.request

        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.proc = subprocess.Popen([sys.executable, str(self.script), self.db_url, str(self.port)], env=env,
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(self.log.read_text()[-2000:])


def drive(url: str, n_clients: int, calls: int) -> dict:
    from gradio_client import Client

    timings: dict[str, list[float]] = {"vote": [], "next": []}
    errors: list[str] = []
    clients = [Client(url, auth=(f"bench{i}", f"bench-password-{i}"), verbose=False) for i in range(n_clients)]
    barrier = threading.Barrier(n_clients)

    def worker(client):
        try:
            token = client.predict(False, api_name="/load")[0]
            barrier.wait()
            for _ in range(calls):
                t0 = time.perf_counter()
                token = client.predict(token, None, None, None, None, None, "", False, api_name="/vote_left")[0]
                timings["vote"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                token = client.predict(False, api_name="/load")[0]
                timings["next"].append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[:3])
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] * 1000  # noqa: E731
    return {
        **{f"{k}_p50_ms": round(q(v, 50), 1) for k, v in timings.items()},
        **{f"{k}_p95_ms": round(q(v, 95), 1) for k, v in timings.items()},
        "calls_per_s": round(sum(len(v) for v in timings.values()) / wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--votes", type=int, default=100_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--calls", type=int, default=40, help="vote and next calls per annotator")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-app-"))
    url = f"sqlite:///{tmp}/app.db"
    _, factory = open_db(url)
    seed(factory, args.items, args.votes, str(tmp / "media"))
    with factory.begin() as s:
        for i in range(N_USERS):
            add_user(s, f"bench{i}", f"bench-password-{i}")
    script = tmp / "noop_app.py"
    script.write_text(NOOP_APP)
    results: dict[str, dict[int, list[dict]]] = {"storypref": {1: [], 16: []}, "noop": {1: [], 16: []}}
    for _ in range(args.rounds):
        for name in ("storypref", "noop"):
            server = (AppServer(url, tmp / f"{name}.log", project="bench") if name == "storypref"
                      else NoopServer(url, tmp / f"{name}.log", script)).start()  # fmt: skip
            try:
                for n in (1, 16):
                    results[name][n].append(drive(server.url, n, args.calls if n == 1 else max(5, args.calls // 4)))
            finally:
                server.stop()
    summary = {}
    for n in (1, 16):
        ours = {k: statistics.median(r[k] for r in results["storypref"][n]) for k in results["storypref"][n][0]}
        floor = {k: statistics.median(r[k] for r in results["noop"][n]) for k in results["noop"][n][0]}
        summary[f"{n}_annotators"] = {
            "storypref": ours,
            "noop": floor,
            "ratios": {k: round(ours[k] / floor[k], 2) for k in ours if k.endswith("_ms")}
            | {"throughput": round(ours["calls_per_s"] / floor["calls_per_s"], 2)},
        }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
