# The quick start: nanoGPT's char-level GPU settings when there is a GPU, the CPU quick start otherwise.
# nanogpt-prepare shakespeare_char && nanogpt-train configs/quickstart.py
import os

import torch

_name = "train_shakespeare_char.py" if torch.cuda.is_available() else "train_shakespeare_char_cpu.py"
exec(open(os.path.join(os.path.dirname(__file__), _name)).read())
# re-runnable: resumes an interrupted run; a run that reached max_iters is reported done
init_from = "auto"
