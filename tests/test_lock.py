"""requirements.lock: every package the server installs, transitive ones included, pinned by hash.

The image installs it with `--require-hashes --no-deps`; it must hold each
direct pin of requirements.txt at the same version, everything those need,
and a hash for every line. Regenerate it as README.md, "Dependencies", says.
"""

from __future__ import annotations

import re
from importlib import metadata

from helpers import ROOT
from packaging.requirements import Requirement


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of requirements.lock."""
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8").replace("\\\n", " ")
    entries = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)", line)
        assert match, f"not a hashed pin: {line}"
        entries[canonical(match[1])] = (match[2], re.findall(r"sha256:([0-9a-f]{64})", match[3]))
    return entries


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def direct() -> list[Requirement]:
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [Requirement(line) for line in (raw.split("#", 1)[0].strip() for raw in lines) if line]


def test_every_direct_pin_is_locked_at_its_version_and_every_line_has_a_hash() -> None:
    lock = locked()
    for requirement in direct():
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"requirements.txt pins exactly: {requirement}"
        assert lock[canonical(requirement.name)][0] == pin.version, requirement
    assert all(hashes for _, hashes in lock.values())


def test_the_lock_holds_what_the_direct_pins_need() -> None:
    """Every dependency of a locked package is locked too (as installed here, where the tests run)."""
    lock = locked()
    missing = []
    for name in lock:
        for raw in metadata.requires(name) or []:
            needed = Requirement(raw)
            if needed.marker is not None and not needed.marker.evaluate({"extra": ""}):
                continue
            if canonical(needed.name) not in lock:
                missing.append(f"{name} needs {needed.name}")
    assert missing == [], missing
