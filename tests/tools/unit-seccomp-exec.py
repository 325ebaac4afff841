#!/usr/bin/python3
"""Run a command under the system-call filter a systemd unit file asks for.

    unit-seccomp-exec.py UNIT -- COMMAND [ARGS...]

Reads the unit's seccomp settings, builds the filters systemd would build from them with
libseccomp (Debian's python3-seccomp), loads them into this process and execs COMMAND, so the
command meets the same filter it would meet as that service.

What is built, as systemd does it (systemd.exec(5)):
  SystemCallFilter=        the first line decides: a list allows only those calls (plus
                           @default), `~list` denies those; later lines add (or, with `~`,
                           remove). Groups (@name) are expanded with `systemd-analyze
                           syscall-filter`, so they are the installed systemd's groups.
  SystemCallErrorNumber=   the action for a call the filter refuses; without it the
                           process is killed (SIGSYS).
  ProtectClock=yes         @clock refused with EPERM (a filter of its own).
  RestrictAddressFamilies= socket() of any other family fails with EAFNOSUPPORT.
  MemoryDenyWriteExecute=  mmap(PROT_WRITE|PROT_EXEC), mprotect/pkey_mprotect(PROT_EXEC)
                           fail with EPERM.
User=                     run as that user (as `nobody` when the machine has no such
                           user), for the calls libraries make only as root (SQLite's fchown).
Not built: SystemCallArchitectures= (only the native ABI is used here), RestrictNamespaces=,
RestrictRealtime=, LockPersonality=, and the non-seccomp settings (namespaces, users, caps).
"""

import errno
import os
import pwd
import socket
import subprocess
import sys

import seccomp


def unit_settings(path):
    settings = []
    section = None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]" and "=" in line:
                key, value = line.split("=", 1)
                settings.append((key.strip(), value.strip()))
    return settings


_groups = {}


def expand(name):
    """A call or @group to the set of call names (groups through systemd-analyze)."""
    if not name.startswith("@"):
        return {name}
    if name not in _groups:
        out = subprocess.run(
            ["systemd-analyze", "syscall-filter", name], check=True, capture_output=True, text=True
        ).stdout
        calls = set()
        for line in out.splitlines()[1:]:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            calls |= expand(line)
        _groups[name] = calls
    return _groups[name]


def resolve(names):
    nrs = set()
    for n in names:
        try:
            nrs.add(seccomp.resolve_syscall(seccomp.Arch.NATIVE, n))
        except (ValueError, RuntimeError):
            pass  # not a call of this architecture
    return {n for n in nrs if n >= 0}


def build(settings):
    allow_list = None  # None: no SystemCallFilter=
    calls = set()
    error_number = None
    families = None
    protect_clock = False
    mdwe = False
    for key, value in settings:
        if key == "SystemCallFilter":
            if not value:
                allow_list, calls = None, set()
                continue
            deny = value.startswith("~")
            names = set()
            for item in value.lstrip("~").split():
                names |= expand(item)
            if allow_list is None:
                allow_list = not deny
                calls = (names | expand("@default")) if allow_list else names
            elif allow_list != deny:
                calls |= names  # same polarity as the first line: more of it
            else:
                calls -= names
        elif key == "SystemCallErrorNumber":
            error_number = getattr(errno, value) if value and not value.startswith("kill") else None
        elif key == "RestrictAddressFamilies":
            families = set() if value == "none" else {getattr(socket, f) for f in value.split()}
        elif key == "ProtectClock":
            protect_clock = value in ("yes", "true", "1", "on")
        elif key == "MemoryDenyWriteExecute":
            mdwe = value in ("yes", "true", "1", "on")

    refuse = seccomp.ERRNO(error_number) if error_number is not None else seccomp.KILL_PROCESS
    filters = []
    # The other filters first: the main one may refuse seccomp() itself, and systemd too loads
    # it last, right before execve.
    main = []
    if allow_list is True:
        f = seccomp.SyscallFilter(refuse)
        for nr in resolve(calls):
            f.add_rule(seccomp.ALLOW, nr)
        main.append(f)
    elif allow_list is False:
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        for nr in resolve(calls):
            f.add_rule(refuse, nr)
        main.append(f)
    if protect_clock:
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        for nr in resolve(expand("@clock")):
            f.add_rule(seccomp.ERRNO(errno.EPERM), nr)
        filters.append(f)
    if families is not None:
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        for fam in range(1, socket.AF_MAX if hasattr(socket, "AF_MAX") else 46):
            if fam not in families:
                f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, fam))
        filters.append(f)
    if mdwe:
        wx = 0x2 | 0x4  # PROT_WRITE | PROT_EXEC
        f = seccomp.SyscallFilter(seccomp.ALLOW)
        f.add_rule(seccomp.ERRNO(errno.EPERM), "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
        for call in ("mprotect", "pkey_mprotect"):
            f.add_rule(seccomp.ERRNO(errno.EPERM), call, seccomp.Arg(2, seccomp.MASKED_EQ, 0x4, 0x4))
        filters.append(f)
    return filters + main


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    filters = build(unit_settings(sys.argv[1]))
    if not filters:
        sys.exit(f"{sys.argv[1]}: no system-call filter to load")
    argv = sys.argv[3:]
    user = dict(unit_settings(sys.argv[1])).get("User")
    if user and os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            pw = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    # Everything that can fail is done before the filters are in.
    sys.stdout.flush()
    sys.stderr.flush()
    for f in filters:
        f.load()
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
