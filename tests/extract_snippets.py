"""Extracts the C code a user may copy: every ```c block of a Markdown file, and the opening
example of a header part (the indented program after "Step by step" in src/00_intro.h).
Usage: extract_snippets.py OUTDIR FILE...
Writes OUTDIR/<file>-L<line>.c for each snippet and prints one line per snippet:
KIND PATH FILE:LINE, where KIND is
  program    has a main(): compiled, linked and run
  vendoring  only #define/#include lines (the implementation file): compiled and linked
  fragment   file-scope code (functions, types): compiled after #include "mgpu.h"
Nothing is dropped: a ```c block the extraction cannot read is an error (exit 1)."""
import os, re, sys

def markdown_blocks(text):
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if re.match(r"^\s*```c\s*$", lines[i]):
            start = i + 1
            j = start
            while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
                j += 1
            if j == len(lines):
                sys.exit(f"unterminated ```c block at line {i + 1}")
            yield start + 1, "\n".join(lines[start:j]) + "\n"
            i = j
        i += 1

def header_example(text):
    """The indented block after the 'Step by step' line of the opening comment."""
    lines = text.split("\n")
    at = next((k for k, l in enumerate(lines) if "Step by step" in l), None)
    if at is None:
        return
    k = at + 1
    while k < len(lines) and not lines[k].strip():
        k += 1
    indent = len(lines[k]) - len(lines[k].lstrip())
    start, body = k, []
    while k < len(lines) and (not lines[k].strip() or len(lines[k]) - len(lines[k].lstrip()) >= indent):
        body.append(lines[k][indent:])
        k += 1
    yield start + 1, "\n".join(body).rstrip() + "\n"

def kind_of(code):
    if re.search(r"\bint\s+main\s*\(", code):
        return "program"
    meaningful = [l for l in code.split("\n") if l.strip() and not l.strip().startswith("//")]
    if meaningful and all(l.lstrip().startswith("#") for l in meaningful):
        return "vendoring"
    return "fragment"

def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for path in sys.argv[2:]:
        text = open(path, encoding="utf-8").read()
        blocks = markdown_blocks(text) if path.endswith(".md") else header_example(text)
        for line, code in blocks:
            name = os.path.join(out, f"{os.path.basename(path)}-L{line}.c")
            with open(name, "w", encoding="utf-8") as f:
                f.write(code)
            print(kind_of(code), name, f"{path}:{line}")

main()
