"""The documentation holds what the code and the protocol say, and its links lead somewhere.

docs/troubleshooting.md has an entry (a heading) for every `error` code (protocol.ErrorCode and
PROTOCOL.md's table) and every close code (PROTOCOL.md's table and protocol.CloseCode), a row for
every HTTP refusal of the upgrade, the advice of every start-up failure and of every refused
combination of settings, and every log event at warning level or above. Every relative link in
README.md, PROTOCOL.md, CHANGELOG.md and docs/ points at a file that exists and, with `#anchor`, at
one of its headings (GitHub's anchors). The README stays short and keeps its two commands.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from helpers import ROOT

import protocol
import server

DOCS = ROOT / "docs"
TROUBLESHOOTING = DOCS / "troubleshooting.md"
README_MAX_LINES = 250
LINKED = [ROOT / "README.md", ROOT / "PROTOCOL.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
# The server's own modules (not the tests' or the benchmarks').
MODULES = sorted(ROOT.glob("*.py"))


def outside_fences(text: str) -> str:
    """The text with fenced code blocks blanked (their lines kept, empty)."""
    lines, fenced = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else line)
    return "\n".join(lines)


def headings(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^#{1,6} (.+?)#*$", outside_fences(text), re.MULTILINE)]


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in headings(text):
        plain = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
        slug = re.sub(r"[^\w\- ]", "", plain).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if seen[slug] else slug)
        seen[slug] += 1
    return found


def section(text: str, title: str) -> str:
    """From the heading `title` (any level) to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", text, re.MULTILINE)
    assert match, f"no heading {title!r}"
    level = len(match.group(1))
    rest = text[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", outside_fences(rest), re.MULTILINE)
    return rest[: end.start()] if end else rest


def table_column(text: str) -> list[str]:
    """The first cell of each body row of the markdown tables in `text`."""
    rows = re.findall(r"^\| *([^|]+?) *\|", text, re.MULTILINE)
    return [row for row in rows if row not in ("code", "status", "setting") and not set(row) <= set("-: ")]


def troubleshooting() -> str:
    return TROUBLESHOOTING.read_text(encoding="utf-8")


def protocol_md() -> str:
    return (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")


# --- troubleshooting: every code the protocol has, every error Tandem prints ------------------


def test_every_error_code_has_an_entry_in_troubleshooting() -> None:
    in_protocol = {cell.strip("`") for cell in table_column(section(protocol_md(), "Error codes"))}
    assert "bad_request" in in_protocol and "unauthorized" in in_protocol, "PROTOCOL.md's error-code table was read"
    codes = in_protocol | {code.value for code in protocol.ErrorCode}
    entries = set(headings(section(troubleshooting(), "Error codes")))
    missing = sorted(code for code in codes if f"`{code}`" not in entries)
    assert not missing, f"docs/troubleshooting.md, Error codes, has no `### \\`code\\`` entry for {missing}"


def test_every_close_code_has_an_entry_in_troubleshooting() -> None:
    in_protocol = {int(cell) for cell in table_column(section(protocol_md(), "Close codes"))}
    assert {1000, 1006, 1012, 1013} <= in_protocol, "PROTOCOL.md's close-code table was read"
    codes = in_protocol | {int(code) for code in protocol.CloseCode}
    entries = {heading.split(":")[0] for heading in headings(section(troubleshooting(), "Close codes"))}
    missing = sorted(code for code in codes if str(code) not in entries)
    assert not missing, f"docs/troubleshooting.md, Close codes, has no `### NNNN: …` entry for {missing}"


def refusals(text: str) -> Counter[tuple[str, str]]:
    """(status, error code) of each row of a table of upgrade refusals."""
    rows = re.findall(r"^\| *(\d{3}) *\| *(.*)$", text, re.MULTILINE)
    found: Counter[tuple[str, str]] = Counter()
    for status, rest in rows:
        code = re.search(r"`([a-z_]+)`", rest)
        found[(status, code.group(1) if code else "")] += 1
    return found


def test_every_refusal_of_the_upgrade_has_a_row_in_troubleshooting() -> None:
    ours = refusals(section(protocol_md(), "Refusals before the upgrade"))
    assert ours[("429", "rate_limited")] == 1 and sum(ours.values()) >= 5, "PROTOCOL.md's refusal table was read"
    theirs = refusals(section(troubleshooting(), "`GET /ws`, before the upgrade"))
    assert theirs == ours, "docs/troubleshooting.md's /ws table must have a row per refusal in PROTOCOL.md"


def string_parts(node: ast.AST) -> Iterator[str]:
    """The literal text of every string in `node`, f-strings' literal parts included."""
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child.value


def advice(texts: Iterator[str]) -> set[str]:
    """The sentences among `texts` (three words or more), without the separators around them."""
    found = set()
    for text in texts:
        cleaned = text.strip().removeprefix(";").strip()
        if len(re.findall(r"[A-Za-z_]+", cleaned)) >= 3:
            found.add(cleaned)
    return found


def function(path: Path, name: str) -> ast.FunctionDef:
    """The function `name` of the module at `path`, without its docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            if ast.get_docstring(node) is not None:
                node.body = node.body[1:]
            return node
    raise AssertionError(f"{path.name} has no function {name}")


def test_every_start_up_failure_is_explained_in_its_words() -> None:
    startup = advice(string_parts(function(ROOT / "server.py", "startup_failure")))
    startup |= set(server.LISTEN_ERRNOS.values())
    assert "set DATA_DIR to a directory Tandem may write" in startup, "server.startup_failure was read"
    combinations = set()  # config.load's checks of settings against each other
    for name in ("load", "_check_auth", "_check_email"):
        for call in ast.walk(function(ROOT / "config.py", name)):
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "ConfigError" and len(call.args) == 3:
                combinations |= advice(string_parts(call.args[2]))
    assert any("SHUTDOWN_GRACE" in text for text in combinations), "config.load's ConfigErrors were read"
    page = " ".join(troubleshooting().split())  # as one line: a table cell or a wrapped paragraph alike
    missing = sorted(text for text in startup | combinations if " ".join(text.split()) not in page)
    assert not missing, f"docs/troubleshooting.md does not quote these start-up errors: {missing}"


def warning_events() -> set[str]:
    """Every log event the server's modules log at WARNING or above, or as an outage or a throttled line."""
    found = set()
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            args = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None for a in node.args]
            if name in ("warning", "error", "critical", "exception") and args and args[0]:
                found.add(args[0])
            elif name == "log" and len(args) > 1 and args[1]:  # Throttle.log and Logger.log(level, event)
                found.add(args[1])
            elif name == "Outage" and len(args) > 2 and args[1] and args[2]:  # its down and up events
                found |= {args[1], args[2]}
    return {event for event in found if re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)+", event)}


def test_every_warning_log_event_is_explained() -> None:
    events = warning_events()
    assert {"connection.crashed", "rate_limit.refused", "archive.unavailable", "server.failed"} <= events
    documented = set(re.findall(r"`([a-z0-9_.]+)`", section(troubleshooting(), "Log events")))
    missing = sorted(events - documented)
    assert not missing, f"docs/troubleshooting.md, Log events, does not explain {missing}"


# --- links and the README ----------------------------------------------------------------------


def links(text: str) -> list[str]:
    """The targets of the inline links outside code (fenced blocks and code spans)."""
    prose = re.sub(r"`[^`]*`", "", outside_fences(text))
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def test_every_relative_link_points_at_a_file_and_heading_that_exist() -> None:
    broken = []
    for page in LINKED:
        text = page.read_text(encoding="utf-8")
        for target in links(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not resolved.exists():
                broken.append(f"{where}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
                broken.append(f"{where}: no heading with that anchor")
    assert not broken, "\n".join(broken)


def test_the_readme_is_short_keeps_its_commands_and_leads_to_every_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = readme.count("\n")
    assert lines <= README_MAX_LINES, f"README.md is {lines} lines; keep it to {README_MAX_LINES}: move detail to docs/"
    commands = re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)
    install = ".venv/bin/pip install -r requirements.txt && .venv/bin/python server.py"
    assert any(install in block for block in commands), "README: the install-and-run command"
    assert "./test.sh\n" in commands, "README: the test command, alone in its block"
    assert "`.venv\\Scripts\\python server.py`" in readme, "README: the Windows commands"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(readme)}
    unlinked = sorted(page.name for page in DOCS.glob("*.md") if page.resolve() not in linked)
    assert not unlinked, f"README.md links to no docs/{unlinked}"
