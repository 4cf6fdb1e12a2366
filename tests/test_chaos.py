"""The seeded chaos test (bench/chaos.py) in the suite: fixed seeds on both stores, no violation.

Each run starts its own Tandem processes (on Redis: two instances and a private
redis-server, append-only with fsync always), runs a seeded schedule of client
operations and faults (kill -9, SIGTERM drains, SIGSTOP, Redis kill -9, cut
pub/sub connections, a session reaching its deadline), bounded in steps and in
time, and checks every frame and the members' presence against the model
(bench/chaos_model.py), whose own checks are tested below on hand-made histories.
The Redis Cluster plan (`--store cluster`) takes seconds per failover: it is
run by hand (docs/testing.md, "Chaos testing").
"""

from __future__ import annotations

import pytest

from bench.chaos import FAULTS, Plan, run_chaos, schedule
from bench.chaos_model import (
    Excuse,
    MemberModel,
    SessionModel,
    View,
    excuse_problems,
    member_problems,
    presence_problems,
    reply_problems,
    view_problems,
)

# store: (seed, steps at most, seconds the steps may take; settling and stopping add a few).
# Each seed's first 200 steps hold every fault of its store at least twice.
RUNS = {"sqlite": (20261134, 600, 22.0), "redis": (20261224, 600, 29.0)}
H = 20


@pytest.mark.parametrize("store", sorted(RUNS))
async def test_a_seeded_chaos_run_finds_no_violation(store: str) -> None:
    seed, steps, seconds = RUNS[store]
    plan = Plan(store, instances=1 if store == "sqlite" else 2)
    result = await run_chaos(plan, seed, steps, time_limit=seconds)
    replay = f"python -m bench.chaos --store {store} --seed {seed} --steps {result.failing_prefix}"
    assert result.ok, f"{result.report()}\nreplay: {replay}"
    faults = sum(n for key, n in result.stats.items() if key.startswith("fault "))
    assert result.done >= 150 and faults >= 5, result.report(verbose=True)  # it really ran
    assert result.stats["acks"] >= 200 and result.stats["resume ok"] >= 20, result.report(verbose=True)


def test_a_schedule_is_a_prefix_of_any_longer_one_of_its_seed() -> None:
    plan = Plan("redis", instances=3)
    long = schedule(7, 300, plan)
    assert schedule(7, 120, plan) == long[:120]
    assert schedule(8, 120, plan) != long[:120]
    assert any(step.fault is not None for step in long)


@pytest.mark.parametrize("store", sorted(RUNS))
def test_each_fixed_seed_holds_every_fault_of_its_store_twice_in_200_steps(store: str) -> None:
    seed, _, _ = RUNS[store]
    kinds = [step.fault.kind for step in schedule(seed, 200, Plan(store, 1 if store == "sqlite" else 2)) if step.fault]
    assert all(kinds.count(kind) >= 2 for kind in FAULTS[store]), kinds


# --- the model on hand-made histories ----------------------------------------------------------


def session_with(*senders: str) -> SessionModel:
    """A session where each sender sent mid "m<n>" with data b"<n>", n = 1, 2, ..."""
    session = SessionModel("CODE", H)
    for n, sender in enumerate(senders, start=1):
        session.new_send(sender, f"m{n}", str(n).encode())
    return session


def test_the_model_flags_a_seq_reused_foreign_data_and_an_unknown_mid() -> None:
    session = session_with("a", "a")
    assert session.stored(1, "a", "m1", b"1") == []
    assert "holds two messages" in session.stored(1, "a", "m2", b"2")[0]
    assert "not what was sent" in session.stored(2, "a", "m2", b"999")[0]
    assert "never sent" in session.stored(3, "b", "m2", b"2")[0]
    assert "without the mid" in session.stored(3, "a", None, b"2")[0]


def test_a_mid_stored_again_is_a_violation_only_while_its_first_copy_is_in_history() -> None:
    session = session_with("a")
    sent = session.sends[("a", "m1")]
    sent.frames = 1
    assert session.acked(sent, 5, duplicate=False) == []
    assert "sent once" in session.acked(sent, 5, duplicate=True)[0]
    sent.frames = 5  # resent: duplicates from now on
    assert session.acked(sent, 5, duplicate=True) == []
    assert "without `duplicate: true`" in session.acked(sent, 5, duplicate=False)[0]
    assert session.acked(sent, 5 + H + 1, duplicate=False) == []  # seq 5 had left history: stored anew
    assert "forgotten" not in str(session.acked(sent, 5 + H + 1, duplicate=True))
    assert "names seq 5" in session.acked(sent, 5, duplicate=True)[0]
    assert "stored twice within history" in session.acked(sent, 5 + 2 * H + 1, duplicate=False)[0]


def test_a_resume_must_replay_every_known_peer_message_above_its_last_seq() -> None:
    session = session_with("a", "b", "a", "a")
    for seq in range(1, 5):
        sender = "b" if seq == 2 else "a"
        assert session.stored(seq, sender, f"m{seq}", str(seq).encode()) == []
    member = MemberModel(session, "b", "token", horizon=0)
    view = View(member, "resume", baseline=0, last_seq=4)
    view.received = [(1, 0), (3, 0)]
    assert "did not send seqs 4" in view_problems(view, redis=False)[0]
    view.received.append((4, 0))
    assert view_problems(view, redis=False) == []  # seq 2 is b's own
    cut = View(member, "resume", baseline=0, last_seq=4, received=[(1, 0)], cut=True)
    assert view_problems(cut, redis=False) == []  # cut off before the rest: nothing to blame
    assert reply_problems(View(member, "resume", 0, 3), known_max=4, recovered=True)[0].startswith("resume reported")
    assert "recovered=True" in reply_problems(View(member, "resume", 1, 2 + H), known_max=0, recovered=True)[0]
    assert reply_problems(View(member, "resume", 2, 2 + H), known_max=0, recovered=True) == []


def test_a_live_gap_is_excused_on_redis_only_when_the_message_may_have_left_history() -> None:
    session = session_with(*["a"] * 30)
    for seq in range(1, 31):
        session.stored(seq, "a", f"m{seq}", str(seq).encode())
    member = MemberModel(session, "b", "token", horizon=0)
    view = View(member, "create", 0, 0, received=[(1, 5), (3, 10)])
    assert "seqs 2 missing" in view_problems(view, redis=True)[0]
    view = View(member, "create", 0, 0, received=[(1, 5), (3, 2 + H)])  # 2 + H sends issued when 3 arrived
    assert view_problems(view, redis=False) != []
    assert view_problems(view, redis=True) == [] and member.excused(2) is not None
    assert excuse_problems(member) == []  # seqs 1 to 30 were all sent before (first_issue 0)
    for seq in range(1, 31):
        session.sends[("a", f"m{seq}")].first_issue = seq + 10  # then: each sent later, 10 sends failed
    assert "held at most seq 12" in excuse_problems(member)[0]


def test_a_member_must_end_with_every_peer_message_but_those_reported_lost() -> None:
    session = session_with("a", "a", "a")
    for seq in range(1, 4):
        session.stored(seq, "a", f"m{seq}", str(seq).encode())
    member = MemberModel(session, "b", "token", horizon=0, processed={3})
    assert "never received seqs 1, 2" in member_problems(member)[0]
    member.excuses.append(Excuse(0, 2, "resume reported recovered: false"))
    assert member_problems(member) == []


def test_presence_must_be_what_the_peer_really_is() -> None:
    session = session_with()
    view = View(MemberModel(session, "a", "token", horizon=0), "resume", 0, 0, peers={"b": True})
    assert presence_problems(view, {"b": True}, set(), unknown_may_be_online=False) == []
    assert "online=True, but it is online=False" in presence_problems(view, {"b": False}, set(), False)[0][1]
    assert presence_problems(view, {"b": None}, set(), False) == []  # its leave's reply was lost: either
    assert "never told" in presence_problems(View(view.member, "create", 0, 0), {"b": False}, set(), False)[0][1]
    assert "which left" in presence_problems(view, {}, {"b"}, False)[0][1]
    # A join whose reply was lost may hold a place: online only while it is in flight.
    assert "never saw join" in presence_problems(view, {}, set(), False)[0][1]
    assert presence_problems(view, {}, set(), unknown_may_be_online=True) == []
    view.peers["b"] = False
    assert presence_problems(view, {}, set(), False) == []


def test_an_expired_connection_must_have_every_message_stored_before_the_end() -> None:
    session = session_with("a", "a", "a")
    for seq in range(1, 4):
        session.stored(seq, "a", f"m{seq}", str(seq).encode())
    member = MemberModel(session, "b", "token", horizon=0)
    view = View(member, "join", 0, 1, received=[(1, 1), (2, 2)], expired="ttl")
    assert "got session:expired before seqs 3" in view_problems(view, redis=False)[0]
    view.received.append((3, 3))
    assert view_problems(view, redis=False) == []
    # "idle": a listener's resync found the session gone with its history: the tail may be missing.
    assert view_problems(View(member, "join", 0, 1, received=[(1, 1)], expired="idle"), redis=True) == []
