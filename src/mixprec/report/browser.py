"""Render an HTML file to a PNG with headless Chromium, to check what a reader will see."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# no network, no background services: a report must render from the file alone
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")


class ScreenshotError(RuntimeError):
    """Chromium is missing, failed, or wrote no image."""


def find_chromium() -> str | None:
    """A Chromium or Chrome binary: ``$MIXPREC_CHROMIUM``, else the first of ``CANDIDATES`` on PATH."""
    env = os.environ.get("MIXPREC_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def screenshot_command(binary: str, html_path: Path, png_path: Path, profile: Path,
                       width: int, height: int) -> list[str]:
    return [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
            f"--screenshot={png_path}", html_path.resolve().as_uri()]


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280, height: int = 4000,
               timeout: float = 60.0, binary: str | None = None) -> Path:
    """Write a ``width`` x ``height`` screenshot of ``html_path`` to ``png_path``.

    Raises ``ScreenshotError`` when no browser is found, it fails or times out, or no image appears.
    """
    binary = binary or find_chromium()
    if not binary:
        raise ScreenshotError(f"no Chromium found (tried $MIXPREC_CHROMIUM and {', '.join(CANDIDATES)})")
    html_path, png_path = Path(html_path), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="mixprec-chromium-") as profile:
        cmd = screenshot_command(binary, html_path, png_path, Path(profile), width, height)
        log.debug("running %s", " ".join(cmd))
        # own session so that a timeout kills the renderer and GPU children too, not just the launcher
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise ScreenshotError(f"{binary} did not finish within {timeout:g} s") from None
    if proc.returncode != 0 or not png_path.is_file():
        tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise ScreenshotError(f"{binary} exited with {proc.returncode} and no screenshot: " + " | ".join(tail))
    return png_path
