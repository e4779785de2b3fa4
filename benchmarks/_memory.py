"""Memory readings shared by the benchmarks (run as scripts from the repository: ``python benchmarks/<name>.py``)."""


def status_mb(field: str) -> float:
    """A memory line of ``/proc/self/status`` in MB: ``VmRSS`` (now) or ``VmHWM`` (peak); NaN where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return float("nan")
