"""Deliberately broken copies of Tandem, to show that the chaos test catches each bug.

`build(name, dest)` copies the tree (modules, static/, sql/) into `dest` and
applies one small edit there; production modules are never touched. Run one
with `python -m bench.chaos --broken NAME`, or all with `python -m bench.chaos_broken`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Broken:
    what: str
    store: str  # the store whose code the edit breaks ("both": the relay)
    edits: tuple[Edit, ...]


BROKEN: dict[str, Broken] = {
    # The batch transaction is committed only every fourth batch, yet every
    # caller is released (and acked) after its own: a kill -9 or a drain loses
    # the acknowledged messages of up to three batches.
    "ack-before-commit": Broken(
        "SQLite commits every 4th batch but acks every batch",
        "sqlite",
        (
            Edit(
                "sqlite_store.py",
                '            db.execute("BEGIN IMMEDIATE")\n',
                '            if not db.in_transaction:  # BROKEN\n                db.execute("BEGIN IMMEDIATE")\n',
            ),
            Edit(
                "sqlite_store.py",
                '            db.execute("COMMIT")\n',
                '            if self.writer.batches % 4 == 3:  # BROKEN\n                db.execute("COMMIT")\n',
            ),
        ),
    ),
    # session:resume answers, but replays nothing.
    "skip-replay": Broken(
        "resume replays nothing",
        "both",
        (
            Edit(
                "relay.py",
                "self._release(code, reply, resumed.replay, resumed.last_seq)",
                "self._release(code, reply, (), resumed.last_seq)  # BROKEN",
            ),
        ),
    ),
    # The store never sees the `mid`: every resend is appended again.
    "ignore-mid": Broken(
        "the relay drops the mid: every resend is a second append",
        "both",
        (
            Edit(
                "relay.py",
                "await self.store.append(code, client_id, self.id, request.data, now, limits, request.mid, acked)",
                "await self.store.append(code, client_id, self.id, request.data, now, limits, None, acked)  # BROKEN",
            ),
        ),
    ),
    # The stores keep the `mid` on the message but never look it up: a resend is
    # stored again under a new seq, its `mid` intact (SQLite's unique index on it
    # goes too), so only the model's "stored twice" check can tell.
    "double-append": Broken(
        "a resend with a known mid is appended again",
        "both",
        (
            Edit(
                "sqlite_store.py",
                '"SELECT seq FROM messages WHERE code = ? AND sender = ? AND mid = ?"',
                '"SELECT seq FROM messages WHERE code = ? AND sender = ? AND mid = ? AND 0"',  # never finds it
            ),
            Edit("sqlite_store.py", "CREATE UNIQUE INDEX IF NOT EXISTS", "CREATE INDEX IF NOT EXISTS"),
            Edit("redis_scripts.py", "  if stored then\n", "  if false then  -- BROKEN\n"),
        ),
    ),
    # A member that goes offline is never announced: its peer believes it online.
    "no-offline": Broken(
        "the relay never sends session:presence online: false",
        "both",
        (
            Edit(
                "relay.py",
                "                self._tell(code, protocol.Presence(client_id, online), client_id)\n",
                "                if online:  # BROKEN\n"
                "                    self._tell(code, protocol.Presence(client_id, online), client_id)\n",
            ),
        ),
    ),
}


def build(name: str, dest: Path) -> Path:
    """A copy of the tree in `dest` with the edits of `name` applied; returns `dest`."""
    if name not in BROKEN:
        raise SystemExit(f"unknown broken build {name!r}; known: {', '.join(BROKEN)}")
    dest.mkdir(parents=True, exist_ok=True)
    for module in ROOT.glob("*.py"):
        shutil.copy2(module, dest / module.name)
    for directory in ("static", "sql"):
        shutil.copytree(ROOT / directory, dest / directory, dirs_exist_ok=True)
    for edit in BROKEN[name].edits:
        target = dest / edit.path
        text = target.read_text()
        if text.count(edit.old) != 1:
            raise SystemExit(f"{name}: the line to break is not in {edit.path} exactly once: {edit.old!r}")
        target.write_text(text.replace(edit.old, edit.new))
    return dest


def main(argv: list[str] | None = None) -> int:
    """Run the chaos test on every broken build (sqlite, and Redis for the relay's bugs); 0 when each fails."""
    parser = argparse.ArgumentParser(prog="python -m bench.chaos_broken", description=__doc__)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--shrink-time", type=float, default=300.0)
    parser.add_argument("--only", default=None, help="one broken build")
    args = parser.parse_args(argv)
    caught = True
    for name, broken in BROKEN.items():
        if args.only not in (None, name):
            continue
        for store in ("sqlite", "redis") if broken.store == "both" else (broken.store,):
            print(f"=== {name} ({broken.what}) on {store}", flush=True)
            command = [sys.executable, "-m", "bench.chaos", "--broken", name, "--store", store]
            command += ["--seed", str(args.seed), "--steps", str(args.steps), "--shrink-time", str(args.shrink_time)]
            code = subprocess.run(command, cwd=ROOT, check=False, timeout=3600).returncode
            if code != 1:
                print(f"=== {name} on {store}: NOT caught (exit {code})", flush=True)
                caught = False
    return 0 if caught else 1


if __name__ == "__main__":
    sys.exit(main())
