"""``widesparse reproduce``: the paper's experiments E1-E10 (docs/theory.md §5) as resumable sweeps with a report.

Modules: :mod:`specs` (runs, points, experiments), :mod:`scales` (every setting, one place), :mod:`catalog`
(E1-E10), :mod:`tasks` (execute one run), :mod:`runner` (local / Ray), :mod:`table`, :mod:`findings`
(the paper's numbers and our verdicts), :mod:`figures`, :mod:`report`.
"""

from widesparse.experiments.catalog import get_experiment, list_experiments
from widesparse.experiments.runner import check_data, expand, format_plan, run_sweep, unique_runs

__all__ = ["check_data", "expand", "format_plan", "get_experiment", "list_experiments", "run_sweep", "unique_runs"]
