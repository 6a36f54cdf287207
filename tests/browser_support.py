"""Open an HTML file in headless Chromium and report what failed to load and what it logged.

A copy of the page gets two small scripts: one at the top of ``<head>`` that records
every error event (a resource that fails to load, an uncaught exception) and every
``console.error``; one at the end of ``<body>`` that, after the ``load`` event, writes
the number of images, those not decoded (``naturalWidth == 0``) and the recorded errors
into a ``<pre id="probe">``. Chromium prints the DOM after loading
(``--dump-dom``), and its own log (``--enable-logging=stderr``) adds any console
message of the page (``CONSOLE`` lines). The flags are the ones Chromium needs on a
machine without network access.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

INSTALL_HINT = ("chromium is not installed: apt-get update && apt-get install -y chromium "
                "(as root; .ci/run does it before the tests)")

_HEAD = ("<script>window.__errors=[];window.addEventListener('error',function(e){var t=e.target;"
         "window.__errors.push(t&&t.tagName?('load failed: '+t.tagName+' '+(t.alt||t.src||'')):"
         "('error: '+e.message));},true);var __ce=console.error;console.error=function(){"
         "window.__errors.push('console.error: '+Array.prototype.join.call(arguments,' '));"
         "__ce.apply(console,arguments);};</script>")
_TAIL = ("<script>window.addEventListener('load',function(){var im=document.images,bad=[];"
         "for(var i=0;i<im.length;i++){if(!im[i].complete||im[i].naturalWidth===0)"
         "bad.push(im[i].alt||String(i));}var d=document.createElement('pre');d.id='probe';"
         "d.textContent=JSON.stringify({images:im.length,bad:bad,errors:window.__errors});"
         "document.body.appendChild(d);});</script>")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom")


def chromium() -> str:
    """The Chromium executable; raises ``AssertionError`` with the install hint if absent."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(INSTALL_HINT)


def open_in_browser(page: Path, timeout: float = 120.0) -> dict:
    """Load ``page`` in headless Chromium.

    Returns:
      ``{"images": int, "bad": [alt of images that did not load], "errors": [recorded
      errors], "console": [CONSOLE lines of Chromium's log], "title": str}``.
    """
    exe = chromium()
    text = page.read_text(encoding="utf-8")
    assert "<head>" in text and "</body>" in text, "not a complete HTML page"
    probed = text.replace("<head>", "<head>" + _HEAD, 1).replace("</body>", _TAIL + "</body>", 1)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / page.name
        copy.write_text(probed, encoding="utf-8")
        done = subprocess.run([exe, *FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}",
                               copy.as_uri()], capture_output=True, text=True, timeout=timeout,
                              check=False)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.DOTALL)
    assert found, (f"the page did not finish loading in Chromium (exit {done.returncode}): "
                   f"{done.stderr[-2000:]}")
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")
                       .replace("&lt;", "<").replace("&gt;", ">"))
    probe["console"] = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    title = re.search(r"<title>(.*?)</title>", done.stdout, re.DOTALL)
    probe["title"] = title.group(1) if title else ""
    return probe
