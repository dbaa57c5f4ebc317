"""Peak resident memory of this process, for the benchmarks' fresh-process measurements."""

from __future__ import annotations


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set (``VmHWM``), in bytes.

    Not ``resource.getrusage().ru_maxrss``: Linux carries that value across ``execve``, so a child started by
    ``subprocess`` (fork, then exec) reports the *parent's* size at fork time whenever the parent was larger, which
    made the benchmark's per-configuration numbers depend on what the parent had done before. ``VmHWM`` belongs to
    the address space, which exec replaces.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line: peak memory needs Linux")
