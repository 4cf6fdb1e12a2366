"""The model the chaos test checks Tandem against: what was sent, stored, acked and seen.

Pure bookkeeping, no I/O: the driver (bench/chaos.py) feeds it every frame and
every ack, and it answers with the problems it sees, at once where one frame
proves them, when a connection closes or after the run where only the whole
story does, and (`presence_problems`) what a connection believes of its peers.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(eq=False)
class Sent:
    """One message a member sent, named by its `mid`; resends reuse it."""

    sender: str  # client_id
    mid: str
    raw: bytes  # the `data` value as compact JSON, exactly as sent
    seqs: list[int] = field(default_factory=list)  # where it is known stored, ascending
    acks: list[int] = field(default_factory=list)  # the seq of each ack it got
    frames: int = 0  # `message:send` frames that carried it
    first_issue: int = 0  # the session's `issued` count with its first frame (0: not known)

    @property
    def acked(self) -> bool:
        return bool(self.acks)


@dataclass(frozen=True)
class Excuse:
    """Seqs in (low, high] a member may never receive, and why (history trimmed).

    `issued`: for a live gap excused as "left history while a listener
    reconnected", the session's `issued` count when the next message arrived;
    checked again after the run (`excuse_problems`), when every stored seq is known.
    """

    low: int
    high: int
    why: str
    issued: int = 0

    def covers(self, seq: int) -> bool:
        return self.low < seq <= self.high


class SessionModel:
    """One session: every message sent in it, and the seqs it is known stored under."""

    def __init__(self, code: str, history: int) -> None:
        self.code = code
        self.history = history  # HISTORY_SIZE
        self.sends: dict[tuple[str, str], Sent] = {}
        self.by_seq: dict[int, Sent] = {}
        self.stored_max = 0  # newest seq known stored (acked or seen)
        self.acked_max = 0
        # `message:send` frames issued so far (resends included): each makes at
        # most one seq, so this bounds the session's newest seq at any moment.
        self.issued = 0
        # The driver moved the session's deadline to now (an expiry fault): from
        # then on any request in it may get `not_found`, and its members
        # `session:expired`.
        self.expiring = False
        self.left: set[str] = set()  # members known to have left for good

    def newest_possible(self, issued: int) -> int:
        """The newest seq the session can have held once `issued` frames went out: a
        message is stored after its first frame, so no later than the newest known
        seq whose message had been sent by then (and never above `issued`)."""
        sent_by_then = (seq for seq, sent in self.by_seq.items() if sent.first_issue <= issued)
        return min(issued, max(sent_by_then, default=0))

    def new_send(self, sender: str, mid: str, raw: bytes) -> Sent:
        sent = Sent(sender, mid, raw)
        self.sends[(sender, mid)] = sent
        return sent

    def stored(self, seq: int, sender: str, mid: str | None, raw: bytes | None) -> list[str]:
        """A message is stored under `seq` (an ack, or a frame that carried it): check and record it."""
        if mid is None:
            return [f"seq {seq} from {sender} arrived without the mid it was sent with"]
        sent = self.sends.get((sender, mid))
        if sent is None:
            return [f"seq {seq}: {sender} never sent mid {mid!r} in {self.code}"]
        problems = []
        if raw is not None and raw != sent.raw:
            problems.append(f"seq {seq} (mid {mid!r}): data {raw[:80]!r} is not what was sent {sent.raw[:80]!r}")
        holder = self.by_seq.get(seq)
        if holder is not None and holder is not sent:
            problems.append(f"seq {seq} holds two messages: mid {holder.mid!r} of {holder.sender} and mid {mid!r}")
            return problems
        self.by_seq[seq] = sent
        self.stored_max = max(self.stored_max, seq)
        if seq not in sent.seqs:
            bisect.insort(sent.seqs, seq)
            # A mid is remembered while its message is in history: when seq r
            # was stored, history held (r - 1 - H, r - 1], so an earlier copy
            # q of the same mid must lie at or below r - 1 - H.
            for older, newer in zip(sent.seqs, sent.seqs[1:], strict=False):
                if older > newer - 1 - self.history:
                    problems.append(
                        f"mid {mid!r} of {sender} stored twice within history: seqs {older} and {newer}"
                        f" (HISTORY_SIZE {self.history})"
                    )
        return problems

    def acked(self, sent: Sent, seq: int, duplicate: bool) -> list[str]:
        problems = []
        if duplicate and sent.frames <= 1:
            problems.append(f"mid {sent.mid!r} was sent once, yet acked as a duplicate (seq {seq})")
        if duplicate and sent.seqs and seq < sent.seqs[-1]:
            problems.append(f"duplicate ack of mid {sent.mid!r} names seq {seq}; it was stored again: {sent.seqs}")
        if not duplicate and seq in sent.acks:
            problems.append(f"mid {sent.mid!r} acked again with its seq {seq} but without `duplicate: true`")
        problems += self.stored(seq, sent.sender, sent.mid, None)
        sent.acks.append(seq)
        self.acked_max = max(self.acked_max, seq)
        return problems


@dataclass(eq=False)
class MemberModel:
    """One member of a session as its client knows it."""

    session: SessionModel
    client_id: str
    token: str
    horizon: int  # seqs at or below it were gone from history when it joined
    state: str = "member"  # "member", "uncertain" (a leave whose reply was lost), "left"
    last_seen: int = 0  # highest seq processed: the `last_seq` of its next resume
    processed: set[int] = field(default_factory=set)
    excuses: list[Excuse] = field(default_factory=list)
    sends: list[Sent] = field(default_factory=list)
    # One of its connections closed (or its resume was answered `unavailable`)
    # while the store was down, so the server could not mark it offline: its
    # peers may see it online until it resumes (docs/architecture.md, Known limits).
    stale_online: bool = False

    def excused(self, seq: int) -> Excuse | None:
        return next((e for e in self.excuses if e.covers(seq)), None)


@dataclass(eq=False)
class View:
    """What one connection received while it held a member: its reply, then its messages.

    `mode` is "create", "join" or "resume"; `baseline` the `last_seq` a resume
    sent; `last_seq` the reply's. Messages up to `last_seq` are the join
    backlog or the resume replay, the rest are live.
    """

    member: MemberModel
    mode: str
    baseline: int
    last_seq: int
    received: list[tuple[int, int]] = field(default_factory=list)  # (seq, session.issued on arrival)
    left: bool = False
    # How the connection ended: None while open, else its close code; `cut` when
    # it ended without the server closing it (a crash, a drop by the client), so
    # that what was queued for it may never have arrived.
    closed: int | None = None
    cut: bool = False
    label: str = ""  # which connection, for reports
    # What this connection was told of the other members: client_id -> online,
    # from its reply's `clients`, then `session:paired`, `session:presence` and
    # `session:peer_left`.
    peers: dict[str, bool] = field(default_factory=dict)
    # `session:expired` ended it with this reason: every message stored before
    # the end was sent to it first (the store publishes in commit order).
    expired: str | None = None

    @property
    def floor(self) -> int:
        """The replay or backlog covers (floor, last_seq]."""
        trimmed = max(0, self.last_seq - self.member.session.history)
        return max(self.baseline, trimmed)

    def on_message(self, seq: int, sender: str) -> list[str]:
        """Checks one `message` frame can fail on arrival (before it is recorded)."""
        member = self.member
        problems = []
        if sender == member.client_id:
            problems.append(f"seq {seq}: {sender} was sent its own message")
        if self.received and seq <= self.received[-1][0]:
            problems.append(f"seq {seq} after seq {self.received[-1][0]} on one connection (order or duplicate)")
        if seq <= self.last_seq and seq <= self.floor:
            problems.append(
                f"{self.mode} with last_seq {self.baseline} (reply last_seq {self.last_seq}) sent seq {seq}"
                f" at or below {self.floor}"
            )
        return problems


def reply_problems(view: View, known_max: int, recovered: bool | None) -> list[str]:
    """Checks of a `session:joined` or `session:resumed` reply.

    `known_max`: the newest seq known stored when the request was sent; a
    durable store never reports less. A resume's `recovered` is true exactly
    when nothing above its `last_seq` had left history.
    """
    problems = []
    if view.last_seq < known_max:
        problems.append(f"{view.mode} reported last_seq {view.last_seq}, but seq {known_max} was stored before it")
    trimmed = max(0, view.last_seq - view.member.session.history)
    if recovered is not None and recovered != (view.baseline >= trimmed):
        problems.append(
            f"resume from {view.baseline} reported recovered={recovered} with last_seq {view.last_seq}"
            f" and HISTORY_SIZE {view.member.session.history}"
        )
    return problems


def seq_list(seqs: list[int], limit: int = 12) -> str:
    return ", ".join(map(str, seqs[:limit])) + (f" ... ({len(seqs)} seqs)" if len(seqs) > limit else "")


def view_problems(view: View, redis: bool) -> list[str]:
    """Did this connection get every known message it should have? (Run when it
    closes and again after the run: what is known only grows.)

    Its replay or backlog must hold every known peer message in (floor,
    last_seq]; its live part every known peer message below the newest it got.
    On Redis an instance whose listener reconnected resends from history what
    it missed, so a live gap is excused when the message may have left history
    by then (its seq at most `issued` - H when the next one arrived); an
    excused gap is recorded on the member.
    """
    member, session = view.member, view.member.session
    me = member.client_id
    got = {seq for seq, _ in view.received}
    problems = []
    # A connection cut off may have lost the end of its replay with it.
    end = view.last_seq if not view.cut else min(view.last_seq, max(got, default=0))
    missing = [
        seq
        for seq in range(view.floor + 1, end + 1)
        if seq not in got and (sent := session.by_seq.get(seq)) is not None and sent.sender != me
    ]
    if missing:
        problems.append(
            f"{view.mode} of {me} in {session.code} from {view.baseline} (reply last_seq {view.last_seq})"
            f" did not send seqs {seq_list(missing)} ({view.label}, closed {view.closed})"
        )
    if view.expired == "ttl":
        # The sweeper's end (the driver moves `ttl_at`): everything stored came
        # first. Reason "idle" is a listener's resync finding the session gone,
        # with its history, so its tail may be missing (Known limits).
        newest = max(session.by_seq, default=0)
        tail = [
            seq
            for seq in range(max(view.floor, max(got, default=0)) + 1, newest + 1)
            if seq not in got
            and (sent := session.by_seq.get(seq)) is not None
            and sent.sender != me
            and member.excused(seq) is None
        ]
        if tail:
            problems.append(
                f"{view.label} of {me} in {session.code} got session:expired before seqs {seq_list(tail)},"
                " stored before the session ended"
            )
    live = [(seq, issued) for seq, issued in view.received if seq > view.last_seq]
    if not live:
        return problems
    gaps = []
    arrivals = iter(live)
    following = next(arrivals)
    for seq in range(view.last_seq + 1, live[-1][0]):
        while following[0] < seq:
            following = next(arrivals)
        sent = session.by_seq.get(seq)
        if sent is None or sent.sender == me or seq in got or member.excused(seq) is not None:
            continue
        if redis and seq <= following[1] - session.history:
            why = "left history while an instance's listener reconnected"
            member.excuses.append(Excuse(seq - 1, seq, why, following[1]))
            continue
        gaps.append(seq)
    if gaps:
        problems.append(
            f"live gap on {view.label} of {me} in {session.code} after its {view.mode} (reply last_seq"
            f" {view.last_seq}): seqs {seq_list(gaps)} missing, seqs up to {live[-1][0]} arrived"
        )
    return problems


def excuse_problems(member: MemberModel) -> list[str]:
    """After the run, when every stored seq is known: a live gap excused as "left
    history" must really have been able to leave it before the next message arrived."""
    session = member.session
    return [
        f"{member.client_id} in {session.code} missed seq {e.high} on a live connection, excused as gone"
        f" from history, yet the session held at most seq {session.newest_possible(e.issued)} by then"
        for e in member.excuses
        if e.issued and e.high > session.newest_possible(e.issued) - session.history
    ]


def member_problems(member: MemberModel) -> list[str]:
    """After the run, for a member still in its session: it processed every known peer message
    above its join horizon, except those its resumes reported lost (`recovered: false`)."""
    missing = [
        seq
        for seq, sent in sorted(member.session.by_seq.items())
        if sent.sender != member.client_id
        and seq > member.horizon
        and seq not in member.processed
        and member.excused(seq) is None
    ]
    if not missing:
        return []
    acked = [seq for seq in missing if member.session.by_seq[seq].acked]
    return [
        f"{member.client_id} in {member.session.code} never received seqs {seq_list(missing)}"
        f" ({len(acked)} of them acknowledged to the sender)"
    ]


def presence_problems(
    view: View, truth: dict[str, bool | None], left: set[str], unknown_may_be_online: bool
) -> list[tuple[str, str]]:
    """Where what a connection believes of the other members is not the truth:
    (client_id, problem) pairs.

    `truth` maps each peer the driver knows in the session to online (it holds
    an open connection that joined or resumed), offline, or None when either
    may be right (its leave's reply was lost); a member in `left` left for good
    and must be gone from the connection's view (`session:peer_left`). A
    client_id the driver does not know is a join whose reply was lost: it may
    hold a place, online only while `unknown_may_be_online` (such a join is
    still in flight).
    """
    problems = []
    for client_id, online in truth.items():
        told = view.peers.get(client_id)
        if online is None:
            continue
        if told is None:
            problems.append((client_id, f"was never told of member {client_id} (online={online})"))
        elif told != online:
            problems.append((client_id, f"believes {client_id} online={told}, but it is online={online}"))
    for client_id, told in view.peers.items():
        if client_id in left:
            problems.append((client_id, f"still counts {client_id} as a member (online={told}), which left"))
        elif client_id not in truth and told and not unknown_may_be_online:
            problems.append((client_id, f"believes {client_id}, a member the driver never saw join, is online"))
    return problems
