"""Screenshots an evaluation's HTML report, or checks it, in headless Chromium.

    python -m refine_jax.commands.report_in_browser --screenshot REPORT.html OUT.png [--width=1280]
    python -m refine_jax.commands.report_in_browser --check REPORT.html  # console errors, images

(`python -m refine_jax.evaluation.report ...` runs this command too. Needs Chromium, e.g.
Debian's `chromium`.)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from refine_jax.evaluation.report import check_in_browser, screenshot


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--screenshot",
        nargs=2,
        metavar=("REPORT_HTML", "OUT_PNG"),
        help="save a screenshot of the report",
    )
    group.add_argument(
        "--check",
        metavar="REPORT_HTML",
        help="print console errors and broken images as JSON (exit 1 if any)",
    )
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.screenshot:
        print(screenshot(*args.screenshot, width=args.width, height=args.height))
        return 0
    outcome = check_in_browser(args.check)
    print(json.dumps(outcome, indent=1))
    return 1 if outcome["broken"] or outcome["problems"] or outcome["console"] else 0


if __name__ == "__main__":
    sys.exit(main())
