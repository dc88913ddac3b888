"""`earlybert prep local-corpus`: a real English corpus from text already on this machine, so the
demo, tests and benchmarks need no download.

Default sources, in this order: docstrings of the Python standard library, docstrings of the
installed packages (site-packages), then .rst/.md/.txt documentation in site-packages and
/usr/share/doc. With `--from DIR` only the documentation files under DIR are read (also
gzip-compressed ones, as Debian ships them): that is how the second benchmark corpus, the Linux
kernel documentation (Debian's linux-doc package), is gathered.
One document per module or file, one paragraph per line, a blank line between documents (BERT's
plain-text convention). Files are walked in sorted order, so the output is the same on every run
on a given machine.

Docstrings are found without importing anything and without `ast.parse`: parsing whole modules
runs at about 3 MB/s of source (50 s for the standard library alone), far from the few seconds
this corpus must take. A regular expression walks the comments and string literals in order; a
docstring is a triple-quoted string that starts a line right after a line ending in ':' (def,
class, ...) or at the top of a module; `ast.literal_eval` decodes it.
"""

import ast
import gzip
import inspect
import multiprocessing as mp
import os
import re
import sysconfig
import time
from pathlib import Path

from common import outputs
from common.outputs import atomic_write
from data_prep import stops
from data_prep.readers import InputError

# Comments and string literals in source order, so that quotes inside them are never taken for
# the start of a docstring. No prefix letters in the pattern: every match then starts with
# '#' or a quote, which the regex engine finds by a fast scan.
_TOKEN = re.compile(
    r"""
    \#[^\n]*
  | (?P<triple>"{3}(?:[^"\\]+|\\.|"(?!""))*"{3}|'{3}(?:[^'\\]+|\\.|'(?!''))*'{3})
  | "(?:[^"\\\n]+|\\.)*"
  | '(?:[^'\\\n]+|\\.)*'
""",
    re.X | re.S,
)
_BLOCK_SPLIT = re.compile(r"\n[ \t]*\n")
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test"}
# Package metadata that is not prose.
_SKIP_FILES = {
    "top_level.txt",
    "entry_points.txt",
    "SOURCES.txt",
    "dependency_links.txt",
    "requires.txt",
    "namespace_packages.txt",
    "installed-files.txt",
    "RECORD",
    "CMakeLists.txt",
}
_MAX_DOC_FILE = 2_000_000
SHARE_DOC = Path("/usr/share/doc")
_DOC_SUFFIXES = (".rst", ".md", ".txt")
# reST/Markdown markup lines that are not prose: directives and comments, heading underlines and
# table rules (punctuation only), and table rows.
_MARKUP_LINE = re.compile(r"^(\.\. |[=\-~^\"'`#*+_:.|<> ]{3,}$|\|.*\|$)")


def _walk(root: Path, suffixes: tuple[str, ...]):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(suffixes) and name not in _SKIP_FILES:
                yield Path(dirpath) / name


def _after_colon_or_top(src: str, pos: int) -> bool:
    """Is the previous code line (skipping blanks and comments) a block header, or is there none?"""
    end = pos
    while True:
        nl = src.rfind("\n", 0, end)
        if nl < 0:
            return True
        start = src.rfind("\n", 0, nl) + 1
        line = src[start:nl].split("#", 1)[0].strip()
        if line:
            return line.endswith(":")
        end = start


def docstrings(src: str) -> list[str]:
    found = []
    for m in _TOKEN.finditer(src):
        if not m.group("triple"):
            continue
        line_start = src.rfind("\n", 0, m.start()) + 1
        prefix = src[line_start : m.start()].strip()
        if prefix not in ("", "r", "R", "u", "U") or not _after_colon_or_top(src, line_start):
            continue
        body = m.group(0)[3:-3]
        if prefix or "\\" in body:
            try:
                body = ast.literal_eval(prefix + m.group(0))
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
        found.append(inspect.cleandoc(body))
    return found


def paragraphs(text: str) -> list[str]:
    """One line per paragraph; blocks that are not prose (doctests, lists of single words) are
    dropped."""
    out = []
    for block in _BLOCK_SPLIT.split(text):
        lines = [s for s in (line.strip() for line in block.splitlines()) if s and not _MARKUP_LINE.match(s)]
        if not lines or lines[0].startswith((">>>", "...", "$ ")):
            continue
        para = " ".join(lines)
        if para.count(" ") + 1 >= 3 * len(lines):  # at least 3 words per line on average
            out.append(para)
    return out


def _module_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    for key in ("purelib", "platlib"):
        if Path(paths[key]) not in roots:
            roots.append(Path(paths[key]))
    return roots


def _candidates(doc_roots: list[Path] | None = None):
    """(source name, path, is Python source) of every candidate document, in a fixed order:
    the default sources, or only the documentation under doc_roots."""
    if doc_roots:
        for root in doc_roots:
            for path in _walk(root, _DOC_SUFFIXES + tuple(s + ".gz" for s in _DOC_SUFFIXES)):
                yield str(root), path, False
        return
    stdlib, *site = _module_roots()
    for name, roots in (("stdlib", [stdlib]), ("site-packages", site)):
        for root in roots:
            for path in _walk(root, (".py",)):
                yield name, path, True
    for name, root in (("site-packages docs", site[0]), ("/usr/share/doc", SHARE_DOC)):
        for path in _walk(root, _DOC_SUFFIXES):
            yield name, path, False


def _extract(candidate) -> tuple[str, list[str]]:
    name, path, is_code = candidate
    try:
        if not is_code and path.stat().st_size > _MAX_DOC_FILE:
            return name, []
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                text = f.read(_MAX_DOC_FILE)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
    except (OSError, EOFError):  # gzip raises EOFError on a truncated file
        return name, []
    if is_code:
        return name, [p for doc in docstrings(text) for p in paragraphs(doc)]
    return name, paragraphs(text)


def gather_local_corpus(path, max_bytes: int, workers: int | None = None, doc_roots: list | None = None) -> dict:
    """Write at most max_bytes of plain text to `path` (atomically) and return statistics.
    Files are read by `workers` processes (default: every usable core), in order. doc_roots:
    read only the documentation files under these directories instead of the default sources."""
    doc_roots = [Path(r) for r in doc_roots or []]
    for root in doc_roots:
        if not root.is_dir():
            raise InputError(
                f"{root}: not a directory; --from takes a directory of .rst/.md/.txt documentation "
                f"(optionally .gz), e.g. /usr/share/doc/linux-doc-6.1/Documentation"
            )
    # An output among the sources would overwrite one, or be read back by the next run.
    outputs.check_output(path, doc_roots or [*_module_roots(), SHARE_DOC])
    outputs.sweep_files(path)
    started = time.time()
    workers = workers or len(os.sched_getaffinity(0))
    stats = {"bytes": 0, "documents": 0, "paragraphs": 0, "files_scanned": 0, "sources": {}}

    def write(f):
        with stops.start_pool(mp.get_context("fork"), workers) as pool:
            for source, paras in pool.imap(_extract, _candidates(doc_roots), chunksize=16):
                stats["files_scanned"] += 1
                if not paras:
                    continue
                data = ("\n".join(paras) + "\n\n").encode()
                if stats["bytes"] + len(data) > max_bytes:
                    break
                f.write(data)
                stats["bytes"] += len(data)
                stats["documents"] += 1
                stats["paragraphs"] += len(paras)
                stats["sources"][source] = stats["sources"].get(source, 0) + len(data)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, write)
    stats["seconds"] = time.time() - started
    return stats
