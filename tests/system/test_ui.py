"""The Prefect UI of the real stack in headless Chromium (Debian's ``chromium``, driven over the DevTools
protocol): the flow-run page of a nightly run shows the run, its task runs (one per stage) with the compile stages
``Cached``, its artifacts, and the summary artifact renders the latency chart. Screenshots are saved for
people (the paths are printed). Chromium missing is a failure, not a skip: ``scripts/setup --dev`` installs it.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pipeline.views import chart

pytest_plugins = ["stack_harness"]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
STAGES = ["import-model", "build", "export-library", "upload", "load", "set-input", "run", "postprocess"]
START_TIMEOUT_S = 30
PAGE_TIMEOUT_S = 45
CALL_TIMEOUT_S = 30


class Browser:
    """One headless Chromium page, driven over the DevTools protocol (every call and wait bounded)."""

    def __init__(self, binary: str, profile: Path, width: int = 1400, height: int = 1900) -> None:
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            assert self.proc.poll() is None, f"chromium exited with code {self.proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=CALL_TIMEOUT_S) as resp:
            page = next(t for t in json.load(resp) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=CALL_TIMEOUT_S)
        self.ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == call_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = PAGE_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in text]
                raise AssertionError(f"the page never showed {missing}; it shows:\n{text[:3000]}")
            time.sleep(0.5)

    def click_text(self, label: str) -> None:
        clicked = self.evaluate(
            "(() => { const e = [...document.querySelectorAll('button, a, [role=tab], [role=tablist] > li')]"
            f".find(e => e.innerText.trim() === {json.dumps(label)}); if (e) e.click(); return !!e; }})()"
        )
        assert clicked, f"nothing to click labelled {label!r}"

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(f"screenshot: {path}")
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("Debian's chromium is not installed: run scripts/setup --dev (apt-get install chromium)")
    return binary


@pytest.fixture
def browser(tmp_path):
    browser = Browser(chromium_binary(), tmp_path / "profile")  # a fresh profile for every test
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-screenshots")


def test_ui__flow_run_page_shows_the_run_and_its_cached_task_runs(stack, nightly_runs, browser, shots):
    stack.ensure_up()
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with stack.client() as client:
        run = client.read_flow_run(nightly_runs.second)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))

    browser.goto(f"{stack.ui_url}/runs/flow-run/{run.id}")
    browser.wait_for_text(run.name, "Completed", "nightly", "resnet-remote", "Task Runs")
    browser.click_text("Task Runs")
    count = f"{len(task_runs)} Task runs"
    text = browser.wait_for_text(*STAGES, "Cached", count)
    listed = text[text.index(count):]
    for stage in ("import-model", "build", "export-library"):  # newest first: each name is followed by its state
        assert listed.split(f"\n{stage}\n", 1)[1].lstrip().startswith("Cached"), stage
    browser.screenshot(shots / "flow-run-task-runs.png")

    browser.click_text("Artifacts")
    browser.wait_for_text(*(f"{kind}-tiny-onnx-{stack.device_key}-" for kind in ("summary", "runs", "top5", "latency",
                                                                                  "latency-trend")))
    browser.screenshot(shots / "flow-run-artifacts.png")


def test_ui__summary_artifact_renders_the_latency_chart(stack, nightly_runs, browser, shots):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    stack.ensure_up()
    with stack.client() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[nightly_runs.second]), type=ArtifactFilterType(any_=["markdown"]),
        ))
    (summary,) = [a for a in found if a.key.startswith("summary-")]
    browser.goto(f"{stack.ui_url}/artifacts/artifact/{summary.id}")
    browser.wait_for_text("Stages", "Cached (not rebuilt): import-model, build, export-library")
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    size = None
    while time.monotonic() < deadline:
        size = browser.evaluate(
            "(() => { const i = [...document.images].find(i => i.src.startsWith('data:image/png'));"
            " return i && i.complete ? [i.naturalWidth, i.naturalHeight] : null; })()"
        )
        if size:
            break
        time.sleep(0.5)
    assert size == list(chart.SIZE), f"the latency chart is not rendered (image size {size})"
    browser.screenshot(shots / "summary-artifact.png")
