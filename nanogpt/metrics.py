"""The run's metrics log: out_dir/metrics.jsonl, one JSON record per line, mirrored to wandb when enabled.

On resume from iteration N the records of iterations >= N (written after the checkpoint by the run
that stopped) are dropped first, so the log reads as if the run had never stopped.
"""
import json
import os

from nanogpt.checkpoint import atomic_write


def trim_log(path, iter_num):
    """Drop the records of iterations >= iter_num from a JSON-lines log (atomically)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            if json.loads(line)["iter"] < iter_num:
                keep.append(line if line.endswith(b"\n") else line + b"\n")
        except (ValueError, KeyError, TypeError):  # a line torn by a crash: drop it
            pass
    if len(keep) != len(lines):
        atomic_write(path, lambda f: f.write(b"".join(keep)))


class MetricsLog:
    """Appends records to `path` (flushed, so a crash loses none), to `wandb` (the module, after wandb.init) and
    to `tensorboard` (a SummaryWriter: the numbers, an event's as <event>/<key>) when given. path=None: a log
    that drops everything (the ranks other than the master)."""

    def __init__(self, path=None, wandb=None, tensorboard=None):
        self.file = open(path, "a") if path else None
        self.wandb, self.tensorboard = wandb, tensorboard

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb:
            self.wandb.log(record)
        if self.tensorboard:
            prefix = f"{record['event']}/" if "event" in record else ""
            for k, v in record.items():
                if k != "iter" and isinstance(v, (int, float)):
                    self.tensorboard.add_scalar(prefix + k, v, record["iter"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()
