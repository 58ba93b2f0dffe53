#!/usr/bin/python3
"""Replaces one section of a doc (between <!-- BEGIN name --> and <!-- END name -->),
or appends it; atomically (a temporary file renamed into place).
    write_section.py DOC NAME TITLE BODY"""
import os
import pathlib
import re
import sys

doc, name, title, body = sys.argv[1:5]
path = pathlib.Path(doc)
text = path.read_text() if path.exists() else f"# {path.stem}\n"
block = f"<!-- BEGIN {name} -->\n## {title}\n\n{body}\n<!-- END {name} -->"
pattern = re.compile(rf"<!-- BEGIN {name} -->.*?<!-- END {name} -->", re.S)
text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
tmp = path.with_suffix(path.suffix + ".tmp")
tmp.write_text(text)
os.replace(tmp, path)
