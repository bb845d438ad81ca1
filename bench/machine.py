"""What a benchmark ran on, and how much memory a process tree used at its peak.

Memory is read from ``/proc`` (Linux): the resident set of a process and of all
its descendants (a pipeline's Prism binary and SDK workers are children of it).
"""
from __future__ import annotations

import os
import platform
import sys
import threading
import time
from typing import Optional


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields follow the last ')'
        fields = stat[stat.rfind(b")") + 2:].split()
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss_by_process(root: int, tree: Optional[dict[int, list[int]]] = None) -> dict[int, int]:
    """Resident memory of ``root`` and of every descendant, now, by process id."""
    tree = _children() if tree is None else tree
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found[pid] = _rss_bytes(pid)
        todo.extend(tree.get(pid, ()))
    return found


def process_name(pid: int) -> str:
    """What a process runs, in a word: the module of ``python -m module``, else the program's file name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except OSError:
        return str(pid)
    argv = [part.decode(errors="replace") for part in argv if part]
    if not argv:
        return str(pid)
    if os.path.basename(argv[0]).startswith("python"):
        for index, arg in enumerate(argv[1:-1], start=1):  # the interpreter's own options come before the program
            if arg == "-m":
                return argv[index + 1]
            if not arg.startswith("-") or arg in ("-c", "-"):
                break
    return os.path.basename(argv[0])


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and every descendant, now."""
    return sum(tree_rss_by_process(root).values())


class PeakMemory:
    """Samples the resident memory of process trees in a thread; keeps the peak of their sum and every sample.

    ``with PeakMemory(interval_s=0.5) as peak: peak.watch(pid) ...`` then ``peak.mb``, or
    ``peak.growth(since, until)`` to see whether memory stayed flat under a steady load.
    """

    def __init__(self, *roots: int, interval_s: float = 0.5):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        self.roots = list(roots)
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.samples: list[tuple[float, int]] = []  # (time.monotonic(), bytes)
        self.process_samples: list[tuple[float, dict[int, int]]] = []  # (time.monotonic(), {pid: bytes})
        self.names: dict[int, str] = {}  # pid -> process_name(pid), read when first seen
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, pid: int) -> None:
        self.roots.append(pid)

    def sample(self) -> int:
        tree, by_process = _children(), {}
        for root in list(self.roots):
            by_process.update(tree_rss_by_process(root, tree))
        for pid in by_process.keys() - self.names.keys():
            self.names[pid] = process_name(pid)
        now, at = sum(by_process.values()), time.monotonic()
        self.peak_bytes = max(self.peak_bytes, now)
        self.samples.append((at, now))
        self.process_samples.append((at, by_process))
        return now

    def growth(self, since: float, until: float) -> dict:
        """Memory between two ``time.monotonic()`` moments: first and last MiB, the least-squares slope, and the
        floor of the first and of the last third.

        Garbage collection and bundle sizes swing a pipeline's memory upwards by tens of MiB for seconds at a
        time, which moves the slope of a two-minute run either way. What a leak raises is the floor: what is
        still held after each collection. "Memory flat" is judged on the floors; the slope is reported beside.

        A third's floor is the sum, over the processes, of each one's lowest sample in it: the tree's processes
        collect on their own schedules (Prism's Go heap went 82 <-> 212 MiB within seconds at 5,250 ev/s while
        the SDK worker's stayed within 290-390), so the lowest sample of their sum is low only where two dips
        happen to meet, and a third that caught such a meeting looked 9 % lower than one that did not, where
        each process's own floor moved 3-4 %. ``*_tree_floor_mb`` is that lowest sum, reported beside. Samples
        set without processes (``samples`` only) count as one process.

        ``processes`` gives each process's own floors (``{name: [first third, last third]}``, the name suffixed
        with its pid where two share it; ``None`` for a third the process was not running in), so that a rise can
        be told apart: the pipeline's SDK worker, or Prism.
        """
        points = [(t, b / 2**20) for t, b in self.samples if since <= t <= until]
        if len(points) < 2:
            raise ValueError(f"need at least two memory samples between {since} and {until}, got {len(points)}")
        third = max(1, len(points) // 3)
        tree_first, tree_last = min(mb for _, mb in points[:third]), min(mb for _, mb in points[-third:])
        by_process = [by for t, by in self.process_samples if since <= t <= until]
        processes = {}
        if len(by_process) == len(points):
            first, last = _floors(by_process[:third]), _floors(by_process[-third:])
            first_floor, last_floor = sum(first.values()) / 2**20, sum(last.values()) / 2**20
            processes = self._named({pid: [_mb(first.get(pid)), _mb(last.get(pid))]
                                     for pid in sorted(first.keys() | last.keys())})
        else:
            first_floor, last_floor = tree_first, tree_last
        mean_t = sum(t for t, _ in points) / len(points)
        mean_mb = sum(mb for _, mb in points) / len(points)
        spread = sum((t - mean_t) ** 2 for t, _ in points)
        slope = sum((t - mean_t) * (mb - mean_mb) for t, mb in points) / spread if spread else 0.0
        return {"first_mb": round(points[0][1], 1), "last_mb": round(points[-1][1], 1),
                "mean_mb": round(mean_mb, 1), "growth_mb_per_min": round(slope * 60, 2), "samples": len(points),
                "first_third_floor_mb": round(first_floor, 1), "last_third_floor_mb": round(last_floor, 1),
                "first_third_tree_floor_mb": round(tree_first, 1), "last_third_tree_floor_mb": round(tree_last, 1),
                "processes": processes}

    def _named(self, by_pid: dict) -> dict:
        names = [self.names.get(pid, str(pid)) for pid in by_pid]
        return {(name if names.count(name) == 1 else f"{name} ({pid})"): value
                for name, (pid, value) in zip(names, by_pid.items())}

    @property
    def mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def _mb(size: Optional[int]) -> Optional[float]:
    return None if size is None else round(size / 2**20, 1)


def _floors(samples: list[dict[int, int]]) -> dict[int, int]:
    """Bytes: each process's lowest sample (a process absent from a sample is not counted in it: one that started
    or ended within the span has its lowest while it ran)."""
    lowest: dict[int, int] = {}
    for by_process in samples:
        for pid, size in by_process.items():
            lowest[pid] = min(size, lowest.get(pid, size))
    return lowest


def _memory_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return float("nan")


def _load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    """Cores, memory, Python, Beam, the local runner, and the load when measured."""
    import apache_beam
    import pyarrow

    return {
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "beam": apache_beam.__version__,
        "pyarrow": pyarrow.__version__,
        "runner": "PrismRunner (local, built from the Beam Go SDK module)",
        "platform": platform.platform(),
        "load_average_1_5_15": _load_average(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run() -> dict:
    return machine()
