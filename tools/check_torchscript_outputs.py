#!/usr/bin/python3
"""Checks that TorchScript models saved by C++ load in plain PyTorch and
reproduce the C++ outputs.

    /usr/bin/python3 tools/check_torchscript_outputs.py DIR [--atol 1e-5]

For every DIR/<name>.pt with a companion DIR/<name>.io.pt (a module whose
buffers are input_0, input_1, ... and expected), runs the model in eval mode
on the inputs and compares with `expected`. Uses torch only; no peft code is
imported, so a pass means the saved model is self-contained. Exits 1 on any
mismatch or load failure, 2 when DIR holds no pair.
"""
import argparse
import glob
import os
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pairs = sorted(glob.glob(os.path.join(args.dir, "*.io.pt")))
    if not pairs:
        print(f"no *.io.pt files in {args.dir}")
        return 2
    failed = 0
    for io_path in pairs:
        model_path = io_path[: -len(".io.pt")] + ".pt"
        io = torch.jit.load(io_path)
        inputs = [getattr(io, f"input_{i}") for i in range(8) if hasattr(io, f"input_{i}")]
        try:
            model = torch.jit.load(model_path)
            model.eval()
            with torch.no_grad():
                out = model(*inputs)
            diff = (out - io.expected).abs().max().item()
            ok = diff <= args.atol
        except Exception as e:  # report and keep checking the others
            diff, ok = repr(e), False
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(model_path)}: max |diff| = {diff}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
