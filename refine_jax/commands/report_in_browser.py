"""Screenshots an evaluation's HTML report, or checks it, in headless Chromium.

    python -m refine_jax.commands.report_in_browser --report=REPORT.html --screenshot=OUT.png \
        [--width=1280] [--height=3000]
    python -m refine_jax.commands.report_in_browser --report=REPORT.html  # console errors, images

Without `--screenshot` it prints the console errors and broken images as JSON and exits 1 if
there are any. (`python -m refine_jax.evaluation.report ...` runs this command too. Needs
Chromium, e.g. Debian's `chromium`.)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import app, flags

from refine_jax.evaluation.report import check_in_browser, screenshot

flags.DEFINE_string("report", None, "The report.html an evaluation wrote.")
flags.DEFINE_string("screenshot", "", "Save a screenshot here (a .png); empty: check.")
flags.DEFINE_integer("width", 1280, "Screenshot width in pixels.")
flags.DEFINE_integer("height", 3000, "Screenshot height in pixels.")
flags.mark_flag_as_required("report")
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: give --report=REPORT.html")
    if FLAGS.screenshot:
        print(screenshot(FLAGS.report, FLAGS.screenshot, width=FLAGS.width, height=FLAGS.height))
        return
    outcome = check_in_browser(FLAGS.report)
    print(json.dumps(outcome, indent=1))
    if outcome["broken"] or outcome["problems"] or outcome["console"]:
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
