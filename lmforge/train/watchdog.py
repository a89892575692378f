"""Heartbeats between the ranks of a torchrun job: a rank that stops or dies ends the job in one line.

    with Watchdog(d, run_dir) as wd:          # d: distributed.Dist; a no-op for one process
        wd.watch(trainer).train()            # the trainer's step and latest checkpoint go in the messages

Every rank's thread writes a heartbeat into the rendezvous store every `interval` seconds (a counter,
the last step the rank completed, its status, host and pid) and reads every peer's. torchrun's store
lives in the launcher, so it still answers while a worker is frozen. Three ways a job ends:

- a peer's counter has not moved for `d.timeout` seconds (SIGSTOP, a frozen machine, a C call holding
  the GIL): every other rank prints "rank 1 stopped making progress after step 12 (no heartbeat for
  20 s); the job resumes from .../step_000010 when restarted with --resume auto" and exits with
  status 2. A stopped peer on the same host is also killed (SIGKILL): it cannot act on the SIGTERM
  torchrun sends, and torchrun would wait 30 s more before killing it itself. A peer whose status
  says it failed (its own error, which it prints) ends the others the same way.
- a collective fails because a peer died (kill -9, out of memory) or raised: the error (a gloo/NCCL
  RuntimeError with a C++ traceback) is caught at the trainer boundary and explained in the same one
  line, naming the rank (its status says it failed; on this host, its pid is gone; elsewhere, its
  heartbeat stops within a few intervals).

A rank that prints such a line ends at once (os._exit(2)): its process group is broken, and tearing a
broken one down takes seconds (gloo) or hangs (NCCL). Its own errors take the usual way (the CLI).
- a collective times out while every rank is alive (all waiting on each other): the process group's
  timeout, a little longer than the watchdog's so that a stopped rank is named first, ends it.

Without a store (one process) nothing runs. Clocks are never compared across hosts: each rank times
its peers' counters with its own monotonic clock.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from lmforge.train import distributed as D

# Phrases of the errors that gloo and NCCL raise when a peer is gone or a collective timed out.
_COMM_ERRORS = (
    "gloo",
    "nccl",
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "timed out waiting",
)


def interval_for(timeout: float) -> float:
    """Seconds between heartbeats: a twentieth of the timeout, between 0.5 and 5 s."""
    return min(max(timeout / 20, 0.5), 5.0)


def is_comm_error(e: BaseException) -> bool:
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and any(p in str(e).lower() for p in _COMM_ERRORS)


def _say(msg: str) -> None:
    """Print `msg` as the CLI prints an error: `lmforge pretrain: error: ...` on stderr."""
    prog = Path(sys.argv[0])
    cli = prog.name == "lmforge" or (prog.name == "__main__.py" and prog.parent.name == "lmforge")
    args = [a for a in sys.argv[1:] if not a.startswith("-")] if cli else []
    print(f"lmforge{' ' + args[0] if args else ''}: error: {msg}", file=sys.stderr, flush=True)


def _exit(msg: str | None = None) -> None:
    """Print the line (unless printed already) and end this process with status 2 at once: the process
    group is broken, and tearing a broken one down can take seconds (gloo) or hang (NCCL)."""
    if msg is not None:
        _say(msg)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def _gone(pid: int) -> bool:
    """True when process `pid` (on this host) has ended: no such process, or a zombie not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


class _Peer:
    """What this rank last read of one peer's heartbeat, and when (its own clock) the counter moved."""

    def __init__(self, rank: int, now: float):
        self.rank, self.changed = rank, now
        self.count, self.step, self.status, self.host, self.pid = -1, -1, "starting", "", 0

    def update(self, value: bytes, now: float) -> None:
        count, step, status, host, pid = value.decode().split(" ")
        if int(count) != self.count:
            self.changed = now
        self.count, self.step, self.status, self.host, self.pid = (
            int(count),
            int(step),
            status,
            host,
            int(pid),
        )

    def at(self, mine: int = -1) -> str:
        """When it stopped: its last heartbeat's step, or this rank's when later (the ranks run in
        lockstep, and a heartbeat may be an interval old)."""
        step = max(self.step, mine)
        return f"after step {step}" if step >= 0 else "during setup"


class Watchdog:
    def __init__(self, d: D.Dist, run_dir: Path | None = None):
        self.d, self.run_dir = d, run_dir
        self.timeout = d.timeout
        self.interval = interval_for(self.timeout)
        self.trainer = None
        self.reported = False  # one of this rank's two threads is printing (has printed) its one line
        self._printed = threading.Event()
        self._lock = threading.Lock()  # heartbeats
        self._report_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._count = 0
        self._status = "running"
        self.host, self.pid = socket.gethostname().replace(" ", "_"), os.getpid()
        self.peers: dict[int, _Peer] = {}
        self.store = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Watchdog:
        if not self.d.active:
            return self
        try:
            store = dist.distributed_c10d._get_default_store()
        except Exception:  # a process group without a store: only the collective timeout applies
            return self
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted group starts afresh
        self.store = dist.PrefixStore(f"lmforge/heartbeat/{attempt}/", store)
        now = time.monotonic()
        self.peers = {r: _Peer(r, now) for r in range(self.d.world) if r != self.d.rank}
        self._beat()
        self._thread = threading.Thread(target=self._run, name="lmforge-watchdog", daemon=True)
        self._thread.start()
        return self

    def watch(self, trainer):
        """Name `trainer`'s step and latest checkpoint in the messages; returns the trainer."""
        self.trainer = trainer
        return trainer

    def __exit__(self, tp, e, tb):
        if self.store is None:
            return False
        if e is None:
            self._close("done")
            return False
        if self.reported:  # the thread has printed the line (and killed the stopped peer)
            self._printed.wait(5)
            _exit()
        if not is_comm_error(e):
            self._close("failed")  # this rank's own error, which the CLI prints; the others name this rank
            return False
        # Our turn to explain. The SIGTERM torchrun sends once a peer is gone must not cut it short (a
        # thread mask would not do: the signal goes to any thread, and by default ends the process).
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self._close("aborted")  # the thread stops first: one line from one of the two
        if not self._claim():
            self._printed.wait(5)
            _exit()
        _exit(self.explain(e))

    def _claim(self) -> bool:
        """True for the first of the two threads that is to print this rank's line."""
        with self._report_lock:
            first, self.reported = not self.reported, True
            return first

    def _close(self, status: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval + 1)
        self._set_status(status)

    # ------------------------------------------------------------------ heartbeats
    @property
    def step(self) -> int:
        return getattr(self.trainer, "step", -1) if self.trainer is not None else -1

    def _set_status(self, status: str) -> None:
        self._status = status
        self._beat()

    def _beat(self) -> None:
        with self._lock:
            self._count += 1
            value = f"{self._count} {self.step} {self._status} {self.host} {self.pid}"
            try:
                self.store.set(str(self.d.rank), value)
            except Exception:  # the store is gone too: the collectives will fail and say so
                pass

    def _read(self) -> None:
        now = time.monotonic()
        keys = [str(r) for r in self.peers]
        try:
            if self.store.check(keys):
                values = self.store.multi_get(keys)
            else:  # some peers have not written yet (get would wait for them)
                values = [self.store.get(k) if self.store.check([k]) else None for k in keys]
        except Exception:
            return
        for peer, v in zip(self.peers.values(), values):
            if v is not None:
                peer.update(v, now)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if now - last > 3 * self.interval + 5:  # this process was frozen itself: judge nobody on it
                for p in self.peers.values():
                    p.changed = now
            last = now
            self._beat()
            self._read()
            if failed := [p for p in self.peers.values() if p.status == "failed"]:
                # its collectives will never come; its connections close only when its process is gone
                p = failed[0]
                self._report(f"rank {p.rank} stopped with an error {p.at(self.step)} (see its message)", [])
            stopped = [p for p in self._watched() if time.monotonic() - p.changed >= self.timeout]
            if stopped:
                p, quiet = stopped[0], time.monotonic() - stopped[0].changed
                who = (
                    f"rank {p.rank}"
                    if len(stopped) == 1
                    else "ranks " + ", ".join(str(q.rank) for q in stopped)
                )
                self._report(
                    f"{who} stopped making progress {p.at(self.step)} (no heartbeat for {quiet:.0f} s)",
                    stopped,
                )

    def _watched(self) -> list[_Peer]:
        """Peers that should be beating: not finished, not exiting after an error of their own."""
        return [p for p in self.peers.values() if p.status in ("running", "starting")]

    def _report(self, msg: str, stopped: list[_Peer]) -> None:
        """(watchdog thread) Print the line, kill the `stopped` peers on this host, end this rank."""
        if not self._claim():  # the main thread is explaining a failed collective
            return
        self._status = "aborted"
        self._beat()
        _say(f"{msg}; {self._resume_hint()}")
        self._printed.set()
        local = [q for q in stopped if q.host == self.host and q.pid]
        for q in local:
            try:
                os.kill(q.pid, signal.SIGKILL)
            except OSError:
                pass
        # A killed peer closes its connections: the main thread's collective fails at once and ends this
        # rank (self.reported) after what it was doing. Else (a peer elsewhere, or one that failed and
        # is still exiting) the main thread may stay blocked until the process group's timeout.
        if stopped and len(local) == len(stopped):
            time.sleep(max(10.0, 2 * self.interval))
        _exit()

    # ------------------------------------------------------------------ explaining a failed collective
    def explain(self, e: BaseException) -> str:
        """(main thread, after a collective raised) One line naming the rank that caused it. The peer's
        own report (failed), its pid (on this host) and its heartbeat (elsewhere) may each take a moment
        to show: the collective fails as soon as its connections close, before the process is gone."""
        hint = self._resume_hint()
        end = time.monotonic() + 2 * self.interval + 1
        self._read()
        seen = {p.rank: p.count for p in self.peers.values()}
        while True:
            for p in self.peers.values():
                if p.status == "failed":
                    return f"rank {p.rank} stopped with an error {p.at(self.step)} (see its message); {hint}"
            for p in self.peers.values():
                if p.host == self.host and p.pid and _gone(p.pid):
                    why = "its process is gone: killed, or out of memory"
                    return f"rank {p.rank} ended unexpectedly {p.at(self.step)} ({why}); {hint}"
            now = time.monotonic()
            for p in self._watched():
                if now - p.changed >= self.timeout:
                    quiet = f"no heartbeat for {now - p.changed:.0f} s"
                    return f"rank {p.rank} stopped making progress {p.at(self.step)} ({quiet}); {hint}"
            if now >= end:
                break
            time.sleep(0.1)
            self._read()
        for p in self._watched():  # alive peers have beaten at least twice since
            if p.count == seen[p.rank]:
                return f"rank {p.rank} stopped responding {p.at(self.step)}; {hint}"
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        first = first.split("] ", 1)[-1]  # gloo prefixes "[path/to/file.cc:78] "
        at = f"after step {self.step}" if self.step >= 0 else "during setup"
        return f"a collective operation failed {at} ({first}); {hint}"

    def _resume_hint(self) -> str:
        ckpt = getattr(getattr(self.trainer, "checkpointer", None), "last", None)
        if ckpt is None and self.run_dir is not None:
            from lmforge.train.state import latest_checkpoint

            ckpt = latest_checkpoint(Path(self.run_dir))
        if ckpt is None:
            return "no checkpoint was written yet: a restart begins again"
        return f"the job resumes from {ckpt} when restarted with --resume auto"
