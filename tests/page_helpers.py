"""The /dashboard page as headless Chromium renders it (Debian's chromium package)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def dashboard_screenshot(url: str, work: Path, name: str, screenshot: bool = True, height: int = 700) -> dict:
    """Loads url/dashboard, lets its scripts run 5 s of virtual time, and returns the DOM, the
    page's <body data-*> attributes (`data`; the heatmap's count also as `nonzero_cells`) and,
    with `screenshot`, artifacts/dashboard-<name>.png (`png`)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium package is required (make test installs it)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={work / ('chrome-' + name)}", "--virtual-time-budget=5000", f"--window-size=1300,{height}"]
    png = None
    if screenshot:
        ARTIFACTS.mkdir(exist_ok=True)
        png = ARTIFACTS / f"dashboard-{name}.png"
        subprocess.run([chromium, *flags, f"--screenshot={png}", url + "/dashboard"], capture_output=True, timeout=120)
    dom = subprocess.run([chromium, *flags, "--dump-dom", url + "/dashboard"], capture_output=True, text=True,
                         timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom)
    data = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))) if body else {}
    return {"png": png, "dom": dom, "data": data, "nonzero_cells": int(data.get("nonzero-cells", 0))}
