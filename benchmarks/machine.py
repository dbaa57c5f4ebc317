"""The machine a benchmark ran on, for every published figure: the CPU's model name and the matrix extensions that
decide its bf16 speed (AMX, AVX-512 bf16)."""

from __future__ import annotations

import os
import platform


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """e.g. ``"Intel(R) Xeon(R) Processor (2 CPUs, AMX, AVX-512 bf16)"``."""
    flags = cpu_flags()
    amx = "AMX" if {"amx_bf16", "amx_tile"} <= flags else "no AMX"
    avx = "AVX-512 bf16" if "avx512_bf16" in flags else "no AVX-512 bf16"
    return f"{cpu_model()} ({os.cpu_count()} CPUs, {amx}, {avx})"
