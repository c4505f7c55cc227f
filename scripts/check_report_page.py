"""Open a report's index.html in headless Chromium with no network; check every image shows.

    python scripts/check_report_page.py out/emt_examples.out.report [--screenshot shot.png]

The folder is first copied elsewhere (the page must work when moved). A copy
of its page, with a script appended that lists each image's load state, is
opened with ``chromium --headless --dump-dom`` inside a network namespace
with no interface (``unshare -n``: root, or user namespaces), so nothing can
be fetched; the page itself is what ``--screenshot`` photographs. Prints one
line per image and exits 1 if one did not load, or if the page names a URL.
Chromium from Debian: ``apt-get install -y chromium``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """<script>
window.addEventListener("load", () => {
  const rows = [...document.images].map(
    (i) => `${i.getAttribute("src")} ${i.complete && i.naturalWidth > 0 ? "loaded" : "MISSING"} ${i.naturalWidth}x${i.naturalHeight}`);
  const pre = document.createElement("pre");
  pre.id = "image-check";
  pre.textContent = rows.join("\\n");
  document.body.appendChild(pre);
});
</script>"""


def chromium_command() -> list[str]:
    """``chromium`` run with no network: inside ``unshare -n`` (refused if that cannot be had)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        raise SystemExit("unshare -n failed: run as root (or with user namespaces) to cut the network off")
    return [
        "unshare",
        "-n",
        "--",
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
    ]


def check(folder: Path, screenshot: Path | None = None) -> list[str]:
    """The images' states (``src loaded WxH``); raises SystemExit(1) naming what failed."""
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        moved = Path(tmp) / "moved-report"
        shutil.copytree(folder, moved)
        page = (moved / "index.html").read_text(encoding="utf-8")
        urls = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:|//)""", page)
        if urls:
            failures.append(f"the page names {len(urls)} URL(s)")
        (moved / "probe.html").write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
        base = chromium_command()
        dom = subprocess.run(
            [*base, "--virtual-time-budget=10000", "--dump-dom", (moved / "probe.html").as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        if screenshot is not None:
            subprocess.run(
                [
                    *base,
                    "--window-size=1400,1800",
                    f"--screenshot={screenshot.resolve()}",
                    (moved / "index.html").as_uri(),
                ],
                capture_output=True,
                timeout=120,
            )
        found = re.search(r'<pre id="image-check">(.*?)</pre>', dom, re.S)
        rows = found.group(1).strip().splitlines() if found else []
        expected = len(json.loads((moved / "report.json").read_text())["figures"])
        if len(rows) != expected:
            failures.append(f"{len(rows)} images on the page, report.json has {expected} figures")
        failures += [f"not shown: {r}" for r in rows if " loaded " not in r]
    if failures:
        raise SystemExit("\n".join(failures))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a report folder (index.html, report.json, PNGs)")
    parser.add_argument("--screenshot", type=Path, help="also write a screenshot of the page (PNG)")
    args = parser.parse_args()
    rows = check(args.folder, args.screenshot)
    print("\n".join(rows))
    print(f"{len(rows)} images shown, network off", file=sys.stderr)


if __name__ == "__main__":
    main()
