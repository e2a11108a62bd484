"""The status page in headless Chromium: a real coordinator (in-process, websockets on 127.0.0.1 port 0)
with two tiny devices (the real SDK client), its status port on port 0.

Round 1 trains and is merged; in round 2 each device reports its first step and then holds until
the test lets it go, so the page shows both devices busy with their steps, and round 1's accuracy.
The browser signs in through the login form (the 401 page), the page is screenshotted into the test's
folder (and to ``$EDGE_FM_STATUS_SCREENSHOT`` if set: docs/img/status.png comes from this run), and
``/status.json`` and ``/metrics`` are checked; without the token every route answers 401.

Without Chromium (``/usr/bin/chromium``) or Playwright the test is skipped, unless
``EDGE_FM_REQUIRE_BROWSER=1`` (CI), where it fails.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import queue
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.federation._config import FederationConfig, ServerConfig, StatusConfig
from coordinator.federation._engine import FederationEngine
from coordinator.serve._server import CoordinatorServer
from coordinator.serve._status_http import open_status
from edge_sdk.client._client import EdgeDevice
from edge_sdk.training._train import TrainConfig, TrainResult, train_local

from .test_client import RandomTokens, options
from .test_engine import TRAINING, ranked_parent
from .test_server import tokens

OPERATOR = "operator-token-for-tests"
NAMES = ["phone-a", "pi-b"]
METRICS = [(0.625, 0.6931), (0.75, 0.5512)]  # what the validation says after rounds 1 and 2
WAIT_S = 90.0


def _browser_path() -> str:
    """Chromium's path, or skip (fail under EDGE_FM_REQUIRE_BROWSER=1) when it or Playwright is missing."""
    required = os.environ.get("EDGE_FM_REQUIRE_BROWSER") == "1"
    path = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
    problem = None
    if path is None:
        problem = "no Chromium: apt-get install chromium (the CI script does)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            problem = "Playwright is not installed: pip install -e '.[dev]'"
    if problem is not None:
        if required:
            pytest.fail(f"EDGE_FM_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(problem)
    assert path is not None
    return path


class Run:
    """The coordinator and its two devices on an event loop in a thread of their own (Playwright's sync
    API drives the browser from the test's thread)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.release = threading.Event()  # round 2's training may go on
        self.finish = threading.Event()  # the status port may close
        self.ports: queue.Queue[int | BaseException] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="status-test-run", daemon=True)

    def _train(self, model: Any, batches: Any, config: TrainConfig, calls: list[int]) -> TrainResult:
        calls.append(1)
        if len(calls) == 2:  # round 2: report a step, then hold until the test has looked
            assert config.on_step is not None
            config.on_step(1, config.steps)
            self.release.wait(WAIT_S)
        return train_local(model, batches, config)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.error = exc
            self.ports.put(exc)

    async def _serve(self) -> None:
        parent, salience = ranked_parent()
        scores = iter(METRICS)

        def evaluator(_: Any) -> dict[str, float]:
            accuracy, loss = next(scores)
            return {"accuracy": accuracy, "loss": loss}

        federation = FederationConfig(rounds=2, min_devices=2, device_wait_s=60, round_deadline_s=WAIT_S * 2)
        engine = FederationEngine(
            parent,  # type: ignore[arg-type]
            salience,  # type: ignore[arg-type]
            federation,
            TRAINING,
            devices=NAMES,
            evaluator=evaluator,
            model_name="tiny-bert",
        )
        config = ServerConfig(host="127.0.0.1", port=0, hello_timeout_s=10.0)
        server = CoordinatorServer(engine, config, tokens(NAMES), run_dir=self.tmp_path / "run")
        await server.start()
        status = open_status(server, StatusConfig(enabled=True, port=0), OPERATOR)
        assert status is not None and status.port is not None
        self.ports.put(status.port)
        running = asyncio.ensure_future(server.run())
        devices = [
            EdgeDevice(
                options(server, name),
                RandomTokens(),
                train_fn=lambda m, b, c, calls=[]: self._train(m, b, c, calls),
            )
            for name in NAMES
        ]
        try:
            await asyncio.wait_for(asyncio.gather(running, *(d.run_async() for d in devices)), WAIT_S * 2)
            await asyncio.to_thread(self.finish.wait, WAIT_S)
        finally:
            running.cancel()
            await server.stop()
            await status.close()

    def port(self) -> int:
        got = self.ports.get(timeout=WAIT_S)
        if isinstance(got, BaseException):
            raise got
        return got


def _get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _raw(port: int, method: str, path: str, body: str = "", **headers: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(method, path, body=body.encode(), headers=headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def _check_refusals(port: int) -> None:
    for path in ("/", "/status.json", "/metrics", "/elsewhere", "/?token=wrong"):
        for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Cookie": "edge_fm_status=forged"}):
            status, answer, _ = _get(port, path, **headers)
            assert status == 401, (path, headers, status)
            assert answer.get("WWW-Authenticate", "").startswith("Bearer")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert _raw(port, "POST", "/login", "token=wrong", **form).status == 401
    assert _raw(port, "POST", "/login", "x" * 5000, **form).status == 413
    assert _raw(port, "GET", "/?" + "&".join(f"k{i}=v" for i in range(20))).status == 400
    # a link with the token sets the cookie and drops the token from the address
    answer = _raw(port, "GET", f"/status.json?token={OPERATOR}")
    assert answer.status == 303 and answer.getheader("Location") == "/status.json"
    cookie = answer.getheader("Set-Cookie") or ""
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and OPERATOR not in cookie
    assert _get(port, "/status.json", Cookie=cookie.split(";")[0])[0] == 200


def _check_snapshot(port: int) -> None:
    status, headers, body = _get(port, "/status.json", Authorization=f"Bearer {OPERATOR}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    snap = json.loads(body)
    run = snap["run"]
    assert (run["round"], run["rounds"], run["phase"], run["model"]) == (1, 2, "training", "tiny-bert")
    assert run["devices_connected"] == 2 and run["devices_busy"] == 2
    assert [h["round"] for h in snap["history"]] == [1]
    assert (snap["history"][0]["accuracy"], snap["history"][0]["loss"]) == METRICS[0]
    assert snap["history"][0]["seconds"] > 0
    by_name = {d["name"]: d for d in snap["devices"]}
    assert sorted(by_name) == sorted(NAMES)
    for device in by_name.values():
        assert device["connected"] and device["busy"] and device["status"] == "connected"
        assert device["progress"] == {"done": 1, "total": TRAINING.local_steps}
        assert device["task"]["kind"] == "TrainTask"
        assert device["plan"]["round"] == 2 and "/" in device["plan"]["heads"] and device["plan"]["levers"]
        assert device["class"] == "override"  # --memory-budget: the budget's source
        assert device["budget_bytes"] > 0 and device["peak_memory_bytes"] > 0
        assert device["bytes_in"] > 0 and device["bytes_out"] > 0
        assert device["rounds_ok"] == 1 and device["last_outcome"] == "ok"
    assert snap["deployments"] == []


def _check_metrics(port: int) -> None:
    status, headers, body = _get(port, "/metrics", Authorization=f"Bearer {OPERATOR}")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("edge_fm_rounds_completed_total") == 1
    assert value("edge_fm_round_duration_seconds_count") == 1
    assert value("edge_fm_round_duration_seconds_sum") > 0
    assert value("edge_fm_round") == 1
    assert value("edge_fm_devices_connected") == 2 and value("edge_fm_devices_busy") == 2
    assert value("edge_fm_updates_total", outcome="merged") == 2
    for outcome in ("rejected", "failed", "late", "missing"):
        assert value("edge_fm_updates_total", outcome=outcome) == 0
    assert value("edge_fm_bytes_total", direction="in") > 0 and value("edge_fm_bytes_total", direction="out") > 0
    assert value("edge_fm_validation_accuracy") == METRICS[0][0]
    assert value("edge_fm_validation_loss") == METRICS[0][1]
    for name in NAMES:
        assert value("edge_fm_device_peak_memory_bytes", device=name) > 0
    assert value("edge_fm_event_loop_lag_seconds") >= 0
    assert value("edge_fm_event_loop_lag_max_seconds") >= value("edge_fm_event_loop_lag_seconds")


def _check_page(port: int, chromium: str, shot: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            first = page.goto(f"http://127.0.0.1:{port}/")
            assert first is not None and first.status == 401  # the login form
            page.fill("input[name=token]", OPERATOR)
            page.click("button[type=submit]")
            timeout = WAIT_S * 1000
            for name in NAMES:
                page.wait_for_selector(f'#devices tr[data-device="{name}"] .bar', timeout=timeout)
            accuracy = page.wait_for_selector('#history tr[data-round="1"] td.acc', timeout=timeout)
            assert accuracy is not None and accuracy.inner_text() == f"{METRICS[0][0]:.4f}"
            page.wait_for_selector('#chart circle[data-round="1"][data-series="accuracy"]', timeout=timeout)
            assert page.inner_text("#phase") == "training"
            assert "1/2 steps" in page.inner_text(f'#devices tr[data-device="{NAMES[0]}"]')
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()


def test_status_page_shows_the_run_and_every_route_needs_the_token(tmp_path: Path) -> None:
    chromium = _browser_path()
    run = Run(tmp_path)
    run.thread.start()
    try:
        port = run.port()
        _check_refusals(port)
        shot = tmp_path / "status.png"
        _check_page(port, chromium, shot)
        assert shot.stat().st_size > 10_000
        if os.environ.get("EDGE_FM_STATUS_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["EDGE_FM_STATUS_SCREENSHOT"])
        _check_snapshot(port)
        _check_metrics(port)
    finally:
        run.release.set()
        run.finish.set()
        run.thread.join(WAIT_S * 3)
    assert not run.thread.is_alive()
    if run.error is not None:
        raise run.error
