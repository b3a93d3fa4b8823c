#!/usr/bin/python3
"""Keeps the repository's documents self-contained.

Checks every Markdown file of the repository (build trees and hidden folders left out):

  * no link or address outside the repository: no http(s)/ftp/mailto/www address anywhere in
    the text (code included), and no relative path that climbs out of the repository root;
  * every relative link target ([text](path), ![alt](path), [ref]: path, href= / src=) exists,
    and a #anchor names a heading of the file it points to;
  * no words about how the work was organised instead of about the project (a word list below).

Usage: docs/check_links.py [ROOT]   (ROOT defaults to the folder above docs/)
Before checking ROOT it checks itself: a set of small bad documents, each of which must be
reported, and a good one, which must not. Exit 0 when everything passes, 1 otherwise.
"""
import os
import re
import sys
import tempfile

# Addresses outside the repository, anywhere in the text.
EXTERNAL = re.compile(r"(?:\b(?:https?|ftp)://|\bmailto:|\bwww\.[a-z0-9-]+\.[a-z])", re.I)
# Markdown links and images: [text](target "title"), reference definitions, HTML attributes.
INLINE_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ATTR = re.compile(r"\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.I)
# A relative path that starts by climbing: ../x, ../../x (in links, code spans or prose).
CLIMBING = re.compile(r"(?<![\w./-])((?:\.\./)+[\w.@+-][\w./@+-]*)")
# Words about the organisation of the work rather than the project. Whole words, any case.
FORBIDDEN = [
    (re.compile(r"\bissues?\b", re.I), "issue"),
    (re.compile(r"\bsessions?\b", re.I), "session"),
    (re.compile(r"\b(?:this|that|the|previous|next|last|earlier|later|each|every|one|a) stops?\b", re.I),
     "stop (as a unit of work)"),
    (re.compile(r"\bstop\s+\d+\b", re.I), "stop (as a unit of work)"),
    (re.compile(r"\bclosing notes?\b", re.I), "closing notes"),
    (re.compile(r"\bthe lead\b", re.I), "the lead"),
    (re.compile(r"\b(?:another|other|the|each|a) helpers?\b(?!\s+(?:program|function|script|class|method|binary|executable|library|header))", re.I),
     "helper (a person)"),
    (re.compile(r"\bwas lent\b|\blent to\b", re.I), "lent machine"),
]
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
CODE_SPAN = re.compile(r"`+[^`]*`+")
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")


def slug(heading):
    """The anchor GitHub-flavoured Markdown gives a heading."""
    text = re.sub(r"`", "", heading).strip().lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors_of(path):
    found, seen, fenced = set(), {}, False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if FENCE.match(line):
                fenced = not fenced
                continue
            m = None if fenced else HEADING.match(line)
            if m:
                s = slug(m.group(1))
                n = seen.get(s, 0)
                seen[s] = n + 1
                found.add(s if n == 0 else f"{s}-{n}")
    return found


def markdown_files(root):
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not d.startswith("build")
                         and not os.path.exists(os.path.join(here, d, "CMakeCache.txt")))
        for name in sorted(files):
            if name.endswith(".md"):
                yield os.path.join(here, name)


def inside(root, path):
    root, path = os.path.realpath(root), os.path.realpath(path)
    return path == root or path.startswith(root + os.sep)


def check_target(root, doc, target, where, problems):
    if EXTERNAL.match(target) or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
        return  # reported by the address check
    path, _, anchor = target.partition("#")
    if path.startswith("/"):
        problems.append(f"{where}: link '{target}' is an absolute path: use a path relative to the document")
        return
    resolved = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
    if not inside(root, resolved):
        problems.append(f"{where}: link '{target}' leads outside the repository")
        return
    if not os.path.exists(resolved):
        problems.append(f"{where}: link '{target}': {os.path.relpath(resolved, root)} does not exist")
        return
    if anchor and resolved.endswith(".md") and anchor.lower() not in anchors_of(resolved):
        problems.append(f"{where}: link '{target}': no heading with anchor #{anchor} in "
                        f"{os.path.relpath(resolved, root)}")


def check_document(root, doc):
    problems = []
    rel = os.path.relpath(doc, root)
    fenced = False
    with open(doc, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        where = f"{rel}:{number}"
        for m in EXTERNAL.finditer(line):
            problems.append(f"{where}: address outside the repository: '{line[m.start():m.start() + 60].split()[0]}'")
        for m in CLIMBING.finditer(line):
            if not inside(root, os.path.join(os.path.dirname(doc), m.group(1))):
                problems.append(f"{where}: path '{m.group(1)}' leads outside the repository")
        for pattern, what in FORBIDDEN:
            for m in pattern.finditer(line):
                problems.append(f"{where}: '{m.group(0)}': documents speak of the project, not of {what}")
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        prose = CODE_SPAN.sub("", line)
        targets = [m.group(1) for m in INLINE_LINK.finditer(prose)] + [m.group(1) for m in HTML_ATTR.finditer(prose)]
        m = REF_DEF.match(prose)
        if m:
            targets.append(m.group(1))
        for t in targets:
            check_target(root, doc, t, where, problems)
    return problems


def check_tree(root):
    problems, count = [], 0
    for doc in markdown_files(root):
        count += 1
        problems += check_document(root, doc)
    return count, problems


SELF_TEST_BAD = {
    "web.md": "See [the paper](https://example.org/paper.pdf).\n",
    "bare.md": "Data from http://example.org/data, mirrored.\n",
    "www.md": "Found at www.example.org in a footnote.\n",
    "mail.md": "Write to <mailto:someone@example.org>.\n",
    "climb.md": "As in [design](../outside/DESIGN.md).\n",
    "climb_code.md": "As in `../../shared/DESIGN.md`, summarised here.\n",
    "missing.md": "The [table](docs/nothing-here.md) and more.\n",
    "image.md": "![plot](plots/absent.png)\n",
    "anchor.md": "# Title\n\nSee [below](#no-such-heading).\n",
    "anchor_other.md": "See [there](good.md#absent-part).\n",
    "refdef.md": "See [the notes][n].\n\n[n]: notes/none.md\n",
    "html.md": '<img src="pics/none.png">\n',
    "absolute.md": "See [the file](/etc/passwd).\n",
    "word_issue.md": "This closes the issue about snapshots.\n",
    "word_session.md": "Measured in this session.\n",
    "word_stop.md": "One run this stop: 1.3 s.\n",
    "word_notes.md": "The closing notes keep the figures.\n",
    "word_lead.md": "Ask the lead.\n",
    "word_helper.md": "Another helper added it.\n",
    "word_lent.md": "No machine was lent for it.\n",
}
SELF_TEST_GOOD = {
    "good.md": ("# Good\n\n## Part two\n\nSee [part two](#part-two), [the other](sub/other.md#its-heading),\n"
                "![a plot](sub/plot.png) and `code [x](y)`.\n\n```sh\n[not](a/link)\n```\n\n"
                "Ctrl-C stops a long call; a helper program writes files; the loop never stops.\n"),
    "sub/other.md": "## Its heading\n\nBack to [the top](../good.md).\n",
    "sub/plot.png": "",
}


def self_test():
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in SELF_TEST_GOOD.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        _, problems = check_tree(tmp)
        if problems:
            failures.append(f"a good document was reported: {problems}")
        for name, text in SELF_TEST_BAD.items():
            path = os.path.join(tmp, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            if not check_document(tmp, path):
                failures.append(f"{name} ({text.strip()!r}) was not reported")
            os.remove(path)
    return failures


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
    failures = self_test()
    if failures:
        print("check_links.py does not catch what it should:\n  " + "\n  ".join(failures))
        return 1
    count, problems = check_tree(root)
    if count == 0:
        print(f"no Markdown files under {root}")
        return 1
    if problems:
        print(f"{len(problems)} problem(s) in the documents under {root}:\n  " + "\n  ".join(problems))
        return 1
    print(f"{count} documents checked: every link stays inside the repository and resolves "
          f"({len(SELF_TEST_BAD)} bad examples caught)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
