#!/usr/bin/python3
"""Checks the layering of include/peft/ (docs/adding-a-method.md): every header
includes only headers of its own layer or below, a method folder includes no
other method folder, and no include cycle exists. Exit status 1 on a violation.

    check_include_layers.py [INCLUDE_DIR]
"""
import os
import re
import sys

METHODS = {"bitfit", "bottleneck", "ia3", "lora", "prefix", "prompt", "vera"}
# Layer of a header, bottom to top; a method extra that needs a PeftModel sits above it.
SPECIAL = {"version.h": 0, "quant/nf4.h": 1, "quant/inject.h": 2, "tuner.h": 3, "methods.h": 5, "peft_model_base.h": 5, "peft_model.h": 5, "native_model.h": 5,
           "lora/weighted.h": 6, "checkpoint.h": 6, "peft.h": 7}
BY_FOLDER = {"core": 0, "io": 1, "jit": 2, "nn": 2, "hf": 2, "generation": 6, "distributed": 6, "serving": 6}


def layer(header):
    if header in SPECIAL:
        return SPECIAL[header]
    folder = header.split("/")[0]
    return 4 if folder in METHODS else BY_FOLDER[folder]


def includes(root):
    graph = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            header = os.path.relpath(path, root)
            code = re.sub(r"//.*", "", open(path).read())  # not the ones quoted in comments
            graph[header] = re.findall(r'#include <peft/([^>]+)>', code)
    return graph


def main():
    root = os.path.join(sys.argv[1] if len(sys.argv) > 1 else "include", "peft")
    graph, errors = includes(root), []
    for header, targets in sorted(graph.items()):
        for target in targets:
            if target not in graph:
                errors.append(f"{header} includes a missing peft/{target}")
            elif layer(target) > layer(header):
                errors.append(f"{header} (layer {layer(header)}) includes peft/{target} (layer {layer(target)}), above it")
            elif layer(header) == 4 and layer(target) == 4 and header.split("/")[0] != target.split("/")[0]:
                errors.append(f"{header} includes another method's peft/{target}")
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                errors.append("include cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    for e in errors:
        print(e)
    print(f"{len(graph)} headers, {len(errors)} violations")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
