"""Stop on SIGTERM/SIGINT (preemption, Ctrl-C) at a step boundary instead of dying mid-step."""
import os
import signal


class StopOnSignal:
    """SIGTERM/SIGINT set `.signal` instead of killing the process, so the trainer can save at the next step
    boundary and exit 0. A second signal is expected (torchrun forwards the one it got to its workers, which a
    Ctrl-C or a scheduler may have signalled already); a third kills as usual. A context manager: the previous
    handlers come back on exit."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals, self.signal, self.count, self.previous = signals, None, 0, {}

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count >= 3:  # insisted: stop now (checkpoints are atomic, nothing is torn)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signal is None:
            self.signal = signum
            print(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step",
                  flush=True)
