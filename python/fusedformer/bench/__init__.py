"""The benchmark harness (``fusedformer bench``): ops x shapes x providers x dtypes x passes with
every competitor timed in the same run, the device's ceilings measured beside them, and reports
in the results format of docs/results-format.md.

    doc = fusedformer.bench.run(ops=["softmax"], preset="quick")   # the results dict
    fusedformer.bench.write(doc, "out/bench")                      # JSON, Markdown, PNG
    fusedformer.bench.validate_results("out/bench/bench.json")     # raises on a malformed file

Op files (FLOP/byte formulas beside each op): fusedformer/bench/cases/<op>.py.
"""

from fusedformer.bench.cases import OPS
from fusedformer.bench.providers import PROVIDERS
from fusedformer.bench.report import markdown, plots, results_name, validate_results, write
from fusedformer.bench.sweep import PASSES, PRESETS, run

__all__ = ["OPS", "PASSES", "PRESETS", "PROVIDERS", "markdown", "plots", "results_name", "run", "validate_results",
           "write"]
