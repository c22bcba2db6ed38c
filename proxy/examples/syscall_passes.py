#!/usr/bin/env python3
"""Where a proxy's time goes between two wake-ups, from a system-wide syscall trace.

A "pass" is one direction of one request through one proxy, as a proxy serving one
request at a time runs it (docs/benchmarks.md, "Where a pass through a sidecar spends its
time"): `epoll_wait` returns, `recvfrom` reads what arrived, the proxy's own code runs,
`writev` sends it on. For each `weft-proxy*` process in the trace this prints the passes'
median and mean user-space time (from `recvfrom`'s return to `writev`'s entry), the
median time inside `writev`, and the whole pass (from `epoll_wait`'s return to `writev`'s
return), in microseconds.

    perf record -e raw_syscalls:sys_enter,raw_syscalls:sys_exit -a -o trace.data -- sleep 3
    perf script -i trace.data -F comm,pid,tid,time,event,trace > trace.txt
    python3 proxy/examples/syscall_passes.py trace.txt LABEL
"""
import collections
import re
import statistics
import sys

EPOLL_WAIT, RECVFROM, WRITEV = 232, 45, 20  # x86_64 syscall numbers
LINE = re.compile(
    r"^\s*(\S+)\s+(\d+)/(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)"
)


def main(path, label):
    entered = {}
    calls = collections.defaultdict(list)  # thread -> [(entry µs, exit µs, syscall)]
    with open(path) as trace:
        for line in trace:
            m = LINE.match(line)
            if not m or not m.group(1).startswith("weft-proxy"):
                continue
            _, _, tid, t, kind, nr = m.groups()
            t, nr = float(t) * 1e6, int(nr)
            if kind == "enter":
                entered[tid] = (t, nr)
            elif entered.get(tid, (0, -1))[1] == nr:
                calls[tid].append((entered.pop(tid)[0], t, nr))
    user, write, whole = [], [], []
    for seq in calls.values():
        for a, b, c in zip(seq, seq[1:], seq[2:]):
            if (a[2], b[2], c[2]) == (EPOLL_WAIT, RECVFROM, WRITEV):
                user.append(c[0] - b[1])
                write.append(c[1] - c[0])
                whole.append(c[1] - a[1])
    if not user:
        sys.exit(f"{label}: no epoll_wait/recvfrom/writev passes in {path}")
    print(
        f"{label:<10} passes {len(user):6d}  user p50 {statistics.median(user):5.1f}"
        f" mean {statistics.mean(user):5.1f} | writev p50 {statistics.median(write):5.1f}"
        f" | whole pass p50 {statistics.median(whole):5.1f} mean {statistics.mean(whole):5.1f}"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else sys.argv[1])
