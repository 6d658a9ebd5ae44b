"""Process titles: every long-lived faasmoe process says what it is in `ps` and `top`.

Without them every function host shows as `python -m faasmoe.platforms.local.zygote` and an
operator cannot tell a server from a zygote or a tenant's orchestrator. Titles all start
with `faasmoe ` followed by the role (`serve :8000`, `zygote`, `function host <name>`,
`orchestrator <tenant>`, `bench <strategy>`); `role_of` reads them back, for the bench's
metering and for tests.
"""

from __future__ import annotations

import psutil

PREFIX = "faasmoe"


def set_title(*parts: object) -> None:
    """Set this process's title (ps, top, /proc/<pid>/cmdline and comm) to `faasmoe <parts...>`."""
    try:
        import setproctitle
    except ImportError:  # a title is a courtesy: never fail a process over it
        return
    setproctitle.setproctitle(" ".join([PREFIX, *(str(p) for p in parts)]))


def title_of(proc: psutil.Process) -> str:
    """A process's command line as one string (a title set by `set_title` comes back as it was set)."""
    return " ".join(a for a in proc.cmdline() if a)


def role_of(proc: psutil.Process) -> tuple[str, str | None]:
    """(role, tenant) of a faasmoe process from its title: role is serve, zygote, function, orchestrator,
    bench, ... or "" for a process that has no faasmoe title; tenant is set for an orchestrator."""
    words = title_of(proc).split()
    if len(words) < 2 or words[0] != PREFIX:
        return "", None
    return words[1], (words[2] if words[1] == "orchestrator" and len(words) > 2 else None)
