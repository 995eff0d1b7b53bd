"""The pages people look at, in a real browser: headless Chromium driven over the DevTools
protocol (`--remote-debugging-pipe`, standard library only).

For the `inspect --html` page and the compare report page: no console error or uncaught
exception while loading; hovering a token (inspect) shows its row of numbers, the same
values as the `--json` report; clicking a column header (compare) sorts the rows; a
screenshot of each is saved (under $RLHF_TOY_SCREENSHOTS if set, else the test's tmp dir).
Skipped, with the reason, where no Chromium is installed (`make browser` installs it).
"""

import base64
import json
import os
import shutil
import subprocess

import pytest
from conftest import run_stage

from rlhf_toy.cli import main
from rlhf_toy.report_html import render_compare_html

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get "
                                "install chromium, or `make browser`)")


class Browser:
    """One headless Chromium page over the DevTools protocol on pipes (fds 3 and 4)."""

    def __init__(self, profile: str):
        r_in, w_in = os.pipe()  # we write commands to w_in; Chromium reads fd 3
        r_out, w_out = os.pipe()  # Chromium writes fd 4; we read r_out

        def child_fds():
            os.dup2(r_in, 3)
            os.dup2(w_out, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
            # close_fds would run after preexec_fn and close fds 3 and 4 again
            preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(r_in)
        os.close(w_out)
        self._w, self._r, self._buf, self._id = os.fdopen(w_in, "wb"), r_out, b"", 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable", session=True)

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self._w.write(json.dumps(msg).encode() + b"\0")
        self._w.flush()
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read()
            self.events.append(event)
            if event.get("method") == method:
                return event

    def open(self, path: str) -> None:
        self.call("Page.navigate", session=True, url="file://" + os.path.abspath(path))
        self.wait_for("Page.loadEventFired")

    def js(self, expression: str):
        out = self.call("Runtime.evaluate", session=True, expression=expression,
                        returnByValue=True)
        assert "exceptionDetails" not in out, out["exceptionDetails"]
        return out["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        found = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                found.append(p["exceptionDetails"].get("text", "exception"))
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") == "error":
                found.append(" ".join(str(a.get("value")) for a in p.get("args", [])))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                found.append(p["entry"]["text"])
        return found

    def hover(self, element: str) -> None:
        """Move the mouse to the centre of `element` (a JavaScript expression), scrolled into
        view first; the centre of its first line box, since an inline token that wraps has a
        bounding box whose centre may lie on another element."""
        x, y = self.js(f"(() => {{ const e = {element}; e.scrollIntoView({{block: 'center'}});"
                       " const r = e.getClientRects()[0];"
                       " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        self.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=x, y=y)

    def screenshot(self, path: str) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png",
                         captureBeyondViewport=True)["data"]
        with open(path, "wb") as fh:
            fh.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except RuntimeError:
            pass
        self._w.close()
        os.close(self._r)
        self.proc.wait(timeout=30)


@pytest.fixture
def browser(tmp_path):
    b = Browser(str(tmp_path / "profile"))
    yield b
    b.close()


def _shots(tmp_path) -> str:
    out = os.environ.get("RLHF_TOY_SCREENSHOTS", str(tmp_path))
    os.makedirs(out, exist_ok=True)
    return out


def test_inspect_page_hover_shows_the_tokens_row(tiny_run, tmp_path, browser):
    root, _ = tiny_run
    ppo = str(tmp_path / "ppo")
    run_stage("ppo", root, "--output_dir", ppo, "--max_steps", "2", "--batch_size", "8",
              "--mini_batch_size", "8", "--n_eval_prompts", "8")
    page, report = str(tmp_path / "inspect.html"), str(tmp_path / "inspect.json")
    assert main(["inspect", "--checkpoint", ppo, "--n", "4", "--html", page,
                 "--json", report]) == 0
    samples = json.load(open(report))["samples"]
    browser.open(page)
    assert browser.errors() == []
    assert browser.js("document.querySelector('.tok .tip').offsetParent") is None  # hidden
    for i, t in ((0, 0), (1, len(samples[1]["token"]) - 1)):
        token = f"document.querySelectorAll('.sample')[{i}].querySelectorAll('.tok')[{t}]"
        browser.hover(token)
        shown = browser.js(f"(() => {{ const tip = {token}.querySelector('.tip');"
                           " return tip.offsetParent ? tip.innerText : null; })()")
        assert shown is not None, f"hovering token {t} of sample {i} shows nothing"
        for column in ("logprob", "ref_logprob", "kl", "reward", "value", "return", "advantage"):
            assert column in shown and f"{samples[i][column][t]:+.4f}" in shown, (column, shown)
        if i == 0:
            browser.screenshot(os.path.join(_shots(tmp_path), "inspect.png"))
    assert browser.errors() == []


def test_compare_page_loads_sorts_and_embeds_the_plots(tmp_path, browser):
    from matplotlib.figure import Figure

    plot = str(tmp_path / "frontier.png")
    fig = Figure(figsize=(4, 3))
    fig.subplots().plot([0, 1, 2], [0.5, 0.7, 0.8], marker="o")
    fig.savefig(plot)
    row = {"gold_reward": 0.5, "proxy_reward": 0.1, "kl_to_ref": 0.0, "win_rate_vs_ref": 0.5,
           "response_len": 5.0}
    summary = {"task": "sentiment", "seed": 0, "n_eval_prompts": 64, "sft": row,
               "ppo": {**row, "gold_reward": 0.81, "gold_reward_se": 0.02, "kl_to_ref": 3.1},
               "dpo": {**row, "gold_reward": 0.74, "gold_reward_se": 0.03, "kl_to_ref": 1.2},
               "sweep": [{"method": "ppo", "beta": 0.05, "steps": 20, **row},
                         {"method": "dpo", "beta": 0.1, "steps": 30, **row}],
               "verdict": {"sentence": "PPO reaches more gold reward at equal KL."},
               "plots": {"frontier": plot}}
    page = str(tmp_path / "report.html")
    with open(page, "w") as fh:
        fh.write(render_compare_html(summary))
    browser.open(page)
    assert browser.js("document.querySelector('img').naturalWidth") == 400  # the plot decoded
    order = "Array.from(document.querySelectorAll('table')[0].tBodies[0].rows).map(r => r.cells[0].innerText)"
    assert browser.js(order) == ["sft", "ppo", "dpo"]
    for expected in (["sft", "dpo", "ppo"], ["ppo", "dpo", "sft"]):  # gold ascending, descending
        browser.js("document.querySelectorAll('table')[0].tHead.rows[0].cells[1].click()")
        assert browser.js(order) == expected
    assert "0.810 ± 0.020" in browser.js("document.body.innerText")
    browser.screenshot(os.path.join(_shots(tmp_path), "compare.png"))
    assert browser.errors() == []
