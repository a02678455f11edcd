"""pytest setup for benchmarks/: bench_*.py are collected only when asked for.

`pytest tests` and a bare `pytest` never run them (they match neither test_*.py nor *_test.py, and
this hook collects them only when benchmarks/ or the file itself is on the command line).
`pytest benchmarks/bench_kernels.py` and `pytest benchmarks` both collect them.
"""
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _asked_for_benchmarks(config):
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        p = (base / arg.split("::")[0]).resolve()
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == HERE
            and not parent.session.isinitpath(file_path)  # an explicit file: pytest collects it itself
            and _asked_for_benchmarks(parent.config)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
