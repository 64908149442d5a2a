"""The HTML evaluation report: one self-contained, escaped page that a real browser renders."""

from __future__ import annotations

import base64
import fcntl
import gc
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
import weakref
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pytest
import torch

from bayesdl import metrics
from bayesdl.predictions import ClassificationPrediction, RegressionPrediction
from bayesdl.report import html as report_html
from bayesdl.report.html import evaluation_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = '<script>alert("x")</script> & "q"'
VOID = {"meta", "img", "br", "hr", "link", "input", "col", "area", "base", "source", "wbr"}


def classification_case(seed: int, n: int = 400, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    centre = 2.5 * torch.randn(n, 3, generator=g)
    logits = centre + (0.5 + shift) * torch.randn(8, n, 3, generator=g)
    y = torch.distributions.Categorical(logits=centre).sample()
    return ClassificationPrediction(torch.log_softmax(logits, -1)), y


def regression_case(seed: int, n: int = 400, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, generator=g)
    means = signal + spread * torch.randn(8, n, generator=g)
    variances = 0.2 + 0.3 * torch.rand(8, n, generator=g)
    y = signal + 0.6 * torch.randn(n, generator=g)
    return RegressionPrediction(means, variances), y


class Page(HTMLParser):
    """Collects section ids, images, table cells and tag balance of a page."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.sections, self.images, self.cells, self.stack, self.errors = [], [], [], [], []
        self.title = ""
        self._in_cell = self._in_title = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs)
        self._in_cell = tag in ("td", "th")
        self._in_title = tag == "title"
        if tag in ("td", "th"):
            self.cells.append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        self._in_cell = self._in_title = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells[-1] += data
        if self._in_title:
            self.title += data

    def row_after(self, label: str) -> str:
        """The text of the cell right after the first cell that reads ``label``."""
        return self.cells[self.cells.index(label) + 1]


def decode_png(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    data = base64.b64decode(uri[len(prefix) :], validate=True)
    assert data.startswith(PNG_MAGIC)
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def assert_self_contained(text: str, page: Page) -> None:
    assert text.startswith("<!DOCTYPE html>")
    assert not page.errors and not page.stack, (page.errors, page.stack)
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower() and "<link" not in text.lower()
    # the page itself forbids the browser any fetch but of data: images
    assert "default-src 'none'; img-src data:;" in text
    assert page.images
    for attrs in page.images:
        image = decode_png(attrs["src"])
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert attrs.get("alt")
    # every src/href in the page is one of the data URIs just decoded
    assert len(re.findall(r"<[a-zA-Z][^<>]*\s(?:src|href)\s*=", text)) == len(page.images)


@pytest.fixture(scope="module")
def classification_page():
    prediction, y = classification_case(0)
    ood, _ = classification_case(1, n=200, shift=2.0)
    text = evaluation_report(
        prediction,
        y,
        title=HOSTILE,
        metrics={"accuracy": float(metrics.accuracy(prediction.probs, y)), "<b>nll</b>": 0.5},
        info={"method": "deep_ensemble", "features": "</td><img src=x onerror=alert(1)>"},
        class_names=["cat", "<i>dog</i>", "a&b"],
        ood_prediction=ood,
    )
    return text, prediction, y, ood


@pytest.fixture(scope="module")
def regression_page():
    prediction, y = regression_case(2)
    text = evaluation_report(
        prediction, y, title="Regression", metrics={"rmse": 0.7}, info={"task": "regression"}
    )
    return text, prediction, y


def test_classification_page_has_its_sections_and_escapes(classification_page):
    text, prediction, y, ood = classification_page
    page = Page(text)
    assert_self_contained(text, page)
    assert page.sections == [
        "model",
        "metrics",
        "classes",
        "calibration",
        "uncertainty",
        "selective",
        "ood",
    ]
    assert len(page.images) == 4  # reliability, histograms, risk-coverage, OOD histograms
    # user strings come back as text, never as markup
    assert page.title == HOSTILE
    assert "<script>alert" not in text and "&lt;script&gt;alert(&quot;x&quot;)" in text
    assert "<b>nll</b>" in page.cells and "<i>dog</i>" in page.cells and "a&b" in page.cells
    assert "<i>dog</i>" not in text and "<img src=x" not in text
    assert "</td><img src=x onerror=alert(1)>" in page.cells
    # the tables hold the numbers of the metrics module
    accuracy = float(metrics.accuracy(prediction.probs, y))
    assert page.row_after("accuracy") == f"{accuracy:.4g}"
    dogs = y == 1
    recall = float((prediction.label[dogs] == 1).double().mean())
    row = page.cells.index("<i>dog</i>")
    assert page.cells[row + 1 : row + 4] == [
        str(int(dogs.sum())),
        str(int((prediction.label == 1).sum())),
        f"{recall:.4g}",
    ]
    auroc = float(metrics.ood_auroc(prediction.epistemic, ood.epistemic))
    assert page.row_after("mutual information") == f"{auroc:.4g}"


def test_regression_page_has_its_sections_and_coverage(regression_page):
    text, prediction, y = regression_page
    page = Page(text)
    assert_self_contained(text, page)
    assert page.sections == ["model", "metrics", "intervals", "coverage", "uncertainty"]
    assert len(page.images) == 4  # predicted vs actual, coverage, quantile calibration, std
    # the coverage table agrees with the intervals found by the quantile search
    wide = RegressionPrediction(prediction.means.double(), prediction.variances.double())
    for level in (0.5, 0.9):
        coverage = float(metrics.picp(*wide.interval(level), y.double()))
        assert page.row_after(f"{level:g}") == f"{coverage:.4g}"
    lower, upper = wide.interval(0.9)
    width = float(metrics.mpiw(lower, upper))
    assert f"90% predictive interval: coverage {coverage:.4g}, mean width {width:.4g}." in text


def drawn_points(monkeypatch) -> list[int]:
    """Record how many data points the line artists of each encoded figure hold."""
    counts = []
    encode = report_html._png

    def counting(fig):
        counts.append(sum(len(line.get_xdata()) for ax in fig.axes for line in ax.lines))
        return encode(fig)

    monkeypatch.setattr(report_html, "_png", counting)
    return counts


def test_supplied_intervals_and_given_ood_metrics(monkeypatch):
    counts = drawn_points(monkeypatch)
    prediction, y = regression_case(3)
    ood, _ = regression_case(4, n=100, spread=1.5)
    lower, upper = prediction.mean - 0.5, prediction.mean + 0.5
    given = {"AUROC (epistemic std)": 0.9125, "AUROC (total std)": 0.75}
    text = evaluation_report(
        prediction,
        y,
        title="t",
        metrics={},
        info={},
        level=0.8,
        intervals=(lower, upper),
        ood_prediction=ood,
        ood_metrics=given,
    )
    page = Page(text)
    coverage = float(metrics.picp(lower, upper, y))
    assert f"80% supplied interval: coverage {coverage:.4g}, mean width 1.</p>" in text
    # coverage figure: the diagonal, the mixture's curve and the supplied interval's point
    assert counts[1] == 2 + len(report_html.COVERAGE_LEVELS) + 1
    assert "No metrics were given." in text
    assert page.sections[-1] == "ood"
    assert page.row_after("AUROC (epistemic std)") == "0.9125"
    assert "AUPR" not in page.cells  # the given table is not replaced by computed numbers


def test_large_data_is_subsampled_and_the_page_stays_small(monkeypatch):
    counts = drawn_points(monkeypatch)
    prediction, y = regression_case(6, n=3000)
    text = evaluation_report(prediction, y, title="t", metrics={}, info={})
    assert len(text.encode()) < 2_000_000
    # predicted against actual: the subsample as points plus the two ends of the diagonal
    assert counts[0] == report_html.MAX_POINTS + 2


def test_figures_are_released_and_the_page_is_reproducible(monkeypatch):
    figures = []
    encode = report_html._png

    def tracking(fig):
        figures.append(weakref.ref(fig))
        return encode(fig)

    monkeypatch.setattr(report_html, "_png", tracking)
    prediction, y = classification_case(7, n=100)
    given = {"AUROC": 0.5}
    text = evaluation_report(prediction, y, title="t", metrics={}, info={}, ood_metrics=given)
    gc.collect()
    assert len(figures) == 3 and all(ref() is None for ref in figures)
    assert Page(text).sections[-1] == "ood"  # the given table, without histograms
    assert (
        evaluation_report(prediction, y, title="t", metrics={}, info={}, ood_metrics=given) == text
    )


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"prediction": "probs"}, TypeError, "ClassificationPrediction or RegressionPrediction"),
        ({"y": torch.zeros(5, dtype=torch.long)}, ValueError, "shape (100,)"),
        ({"y": torch.full((100,), 3)}, ValueError, "in [0, 3)"),
        ({"metrics": {"nll": "low"}}, TypeError, "real number"),
        ({"metrics": [0.5]}, TypeError, "dict of name -> number"),
        ({"info": {1: "a"}}, TypeError, "info keys must be strings"),
        ({"class_names": ["a", "b"]}, ValueError, "all 3 classes"),
        ({"intervals": (torch.zeros(100), torch.ones(100))}, ValueError, "for regression"),
        ({"level": 1.5}, ValueError, "strictly between 0 and 1"),
        ({"ood_prediction": regression_case(0, n=10)[0]}, TypeError, "like prediction"),
    ],
)
def test_bad_input_is_explained(change, error, message):
    prediction, y = classification_case(8, n=100)
    arguments = {"prediction": prediction, "y": y, "title": "t", "metrics": {}, "info": {}}
    with pytest.raises(error, match=re.escape(message)):
        evaluation_report(**{**arguments, **change})


def test_bad_regression_input_is_explained():
    prediction, y = regression_case(9, n=50)
    with pytest.raises(ValueError, match="lower <= upper"):
        evaluation_report(prediction, y, title="t", metrics={}, info={}, intervals=(y + 1, y - 1))
    with pytest.raises(ValueError, match="class_names are for classification"):
        evaluation_report(prediction, y, title="t", metrics={}, info={}, class_names=["a"])
    infinite = (y - float("inf"), y + 1)
    with pytest.raises(ValueError, match="intervals must be finite"):
        evaluation_report(prediction, y, title="t", metrics={}, info={}, intervals=infinite)
    two_targets = RegressionPrediction(torch.zeros(2, 50, 2), torch.ones(2, 50, 2))
    with pytest.raises(ValueError, match="one-target"):
        evaluation_report(two_targets, y, title="t", metrics={}, info={})


# ---------------------------------------------------------------- in a real browser

# Puts two inherited descriptors on fds 3 and 4, then becomes Chromium (a shell cannot name fds
# above 9 portably).
_EXEC_WITH_PIPES = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.dup2(int(sys.argv[2]), 4)
os.close(int(sys.argv[1]))
os.close(int(sys.argv[2]))
os.execv(sys.argv[3], sys.argv[3:])
"""
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (no extra package).

    Chromium reads commands from its fd 3 and writes replies and events to its fd 4, each
    message JSON ended by a NUL byte.
    """

    def __init__(self, binary: str, profile: os.PathLike, timeout: float = 30.0):
        self.deadline = time.monotonic() + timeout
        to_child, self._to_child = os.pipe()
        self._from_child, from_child = os.pipe()
        # move the child's ends above 9, so that putting them on 3 and 4 cannot clobber either
        child_in = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
        os.close(to_child)
        os.close(from_child)
        flags = [
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            "--disable-extensions",
            "--remote-debugging-pipe",
            f"--user-data-dir={os.fspath(profile)}",
            "about:blank",
        ]
        self._log = open(os.path.join(profile, "chromium.log"), "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_PIPES, str(child_in), str(child_out), binary, *flags],
            pass_fds=(child_in, child_out),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        os.close(child_in)
        os.close(child_out)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _message(self) -> dict:
        while b"\0" not in self._buffer:
            left = self.deadline - time.monotonic()
            ready, _, _ = select.select([self._from_child], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("Chromium did not answer over the DevTools pipe in time.")
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise RuntimeError(
                    f"Chromium closed the DevTools pipe (exit {self.process.poll()})."
                )
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        os.write(self._to_child, json.dumps(command).encode() + b"\0")
        while True:
            message = self._message()
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method} failed: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str) -> None:
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self._message())

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        self._log.close()

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads the page reported."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(" ".join(str(a.get("value")) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.skip(
            "no Chromium binary on PATH (looked for " + ", ".join(CHROMIUM_NAMES) + "); install "
            "it (Debian: apt-get install chromium) to render the report in a browser"
        )
    return binary


def render(binary, path, profile) -> tuple[np.ndarray, list[str], list]:
    """Open ``path`` in headless Chromium: (screenshot RGB (H, W, 3), errors, image sizes)."""
    profile.mkdir()
    browser = Browser(binary, profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session=session)
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1200, "height": 3000, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        browser.call("Page.navigate", {"url": path.resolve().as_uri()}, session)
        browser.wait_for("Page.loadEventFired")
        sizes = browser.call(
            "Runtime.evaluate",
            {
                "expression": "Array.from(document.images, i => [i.complete, i.naturalWidth])",
                "returnByValue": True,
            },
            session,
        )["result"]["value"]
        shot = browser.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
    finally:
        browser.close()
    image = matplotlib.image.imread(io.BytesIO(base64.b64decode(shot)), format="png")
    return image[..., :3], browser.errors(), sizes


def non_white_share(image: np.ndarray) -> float:
    return float((image.min(-1) < 0.9).mean())


def figure_pixels(image: np.ndarray) -> int:
    """Pixels of matplotlib's first colour, which every figure of the report draws with."""
    blue = np.array([0x1F, 0x77, 0xB4]) / 255
    return int((np.abs(image - blue).max(-1) < 0.04).sum())


@pytest.mark.parametrize("case", ["classification_page", "regression_page"])
def test_page_renders_in_chromium(chromium, case, request, tmp_path):
    text = request.getfixturevalue(case)[0]
    path = tmp_path / "report.html"
    path.write_text(text, encoding="utf-8")
    image, errors, sizes = render(chromium, path, tmp_path / "profile")
    assert errors == []
    assert image.shape == (3000, 1200, 3)
    # the page is painted: text and tables, and the figures in their colours
    assert non_white_share(image) > 0.01
    assert figure_pixels(image) > 1000
    # the browser decoded every figure
    assert len(sizes) == len(Page(text).images)
    assert all(complete and width > 300 for complete, width in sizes)


def test_browser_check_sees_errors_and_blank_pages(chromium, tmp_path):
    """The check above can fail: a page that fetches a file and logs an error, and draws nothing."""
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; img-src data:; script-src 'unsafe-inline'\"></head>"
        '<body><img src="missing.png"><script>console.error("boom")</script></body></html>'
    )
    image, errors, sizes = render(chromium, broken, tmp_path / "profile")
    assert "boom" in errors
    assert any("missing.png" in error for error in errors)
    assert non_white_share(image) < 0.01 and figure_pixels(image) == 0
    assert sizes == [[True, 0]]
