"""``m2pt bench``: step time, memory and decode speed of M²PT against LoRA, full finetuning and a floor.

All methods are timed in one process, interleaved step by step, so drift hits all of them alike
(``compare``, ``timing``). Peak memory is measured per method in a child process (``memory``: CUDA
peak allocated on a GPU, peak RSS on CPU). ``prompt_path`` prices the prompts on the forward and
decode paths, ``evaluation`` the answering path, ``curves`` the cost per added token; ``report``
writes what was measured, on what.
"""

from m2pt_cli.benchmark.compare import run
from m2pt_cli.benchmark.compiled import graph_breaks
from m2pt_cli.benchmark.curves import curve, curves_markdown, curves_report, parse_curve, plot_curves
from m2pt_cli.benchmark.evaluation import EVAL_BATCH_SIZE, eval_throughput
from m2pt_cli.benchmark.methods import METHODS, Shapes, build_method, method_recipe, synthetic_batch, train_step
from m2pt_cli.benchmark.report import markdown, write_report

__all__ = [
    "EVAL_BATCH_SIZE",
    "METHODS",
    "Shapes",
    "build_method",
    "curve",
    "curves_markdown",
    "curves_report",
    "eval_throughput",
    "graph_breaks",
    "markdown",
    "method_recipe",
    "parse_curve",
    "plot_curves",
    "run",
    "synthetic_batch",
    "train_step",
    "write_report",
]
