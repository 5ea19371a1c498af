"""The embedded demo: train small teachers, distil them with every method, evaluate, write a report.

`run_demo(DemoConfig)` runs the stages through the Python API (`diffdistill.train_teacher`,
`diffdistill.distill`, each shown in the report as the equivalent `diffdistill` command), then samples every model
at several step counts and writes `DIR/index.html`, `DIR/report.md` and `DIR/results.json` (`report.write_report`).
"""

from .pipeline import METHODS, PROFILES, DemoConfig, Profile, run_demo  # noqa: F401
from .report import write_report  # noqa: F401
