"""`python -m nanogpt_kernels`: one line per backend saying whether it runs here, then the op table."""
import torch

from nanogpt_kernels import registry


def report(device_type):
    lines = []
    for b in registry.BACKENDS:
        why = registry.backend_unavailable(b, device_type)
        extra = ""
        if b == "ext" and why is None:
            from nanogpt_kernels import ext
            extra = f" (built{', with CUDA' if ext._C.has_cuda() else ', CPU only'}; CPU ISA clone {ext._C.cpu_isa()})"
        lines.append(f"{b} on {device_type}: {'runs' + extra if why is None else 'unavailable: ' + why}")
    for op in registry.OPS:
        row = {b: ("yes" if registry.unavailable(op, b, device_type) is None else "no") for b in registry.BACKENDS}
        lines.append(f"  {op:<11} " + "  ".join(f"{b}={v}" for b, v in row.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report("cuda" if torch.cuda.is_available() else "cpu"))
