"""``qkprobe report``: the paper's figures from run files as a self-contained HTML page.

    from qkprobe.report import build_report
    build_report(["run.h5"], "report/")     # report/index.html + report/figures/*.png

The figures themselves are :mod:`qkprobe.plot` functions (the same ones notebooks use).
:func:`qkprobe.report.browser.check_page` opens a page in headless Chromium and returns its
console errors, image sizes and a screenshot.
"""

from .build import build_report, choose_heads, layer_curve_data, read_run  # noqa: F401
