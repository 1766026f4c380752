"""The browser tests' common switch: they need Chromium (Debian's ``chromium``), and fail rather
than skip without it unless ``QKPROBE_SKIP_BROWSER=1`` says to skip knowingly."""

import os

import pytest

from qkprobe.report.browser import find_chromium

needs_browser = pytest.mark.skipif(os.environ.get("QKPROBE_SKIP_BROWSER") == "1", reason="QKPROBE_SKIP_BROWSER=1")


def require_browser() -> None:
    if not find_chromium():
        pytest.fail("Chromium is not installed (Debian: apt-get install -y chromium); the report must be checked "
                    "in a real browser. Set QKPROBE_SKIP_BROWSER=1 to skip knowingly.")
