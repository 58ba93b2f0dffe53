#!/usr/bin/python3
"""Replaces one section of docs/performance.md (between <!-- BEGIN name --> and
<!-- END name -->), or appends it.   write_section.py NAME TITLE BODY"""
import pathlib
import re
import sys

name, title, body = sys.argv[1:4]
path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "performance.md"
text = path.read_text() if path.exists() else "# Performance\n"
block = f"<!-- BEGIN {name} -->\n## {title}\n\n{body}\n<!-- END {name} -->"
pattern = re.compile(rf"<!-- BEGIN {name} -->.*?<!-- END {name} -->", re.S)
text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
path.write_text(text)
