"""Run a command with the privileges systemd/masqd.service gives masqd, without systemd.

The unit bounds root to CAP_NET_ADMIN, sets NoNewPrivileges, and enforces
MemoryDenyWriteExecute, which is a seccomp filter. Tests run the daemon (and a libnftables
probe) under the same three restrictions to show the hardening does not break it: `setpriv`
for the capabilities and no_new_privs, and the filter below, which refuses exactly what
systemd's does on x86-64 (src/shared/seccomp-util.c, seccomp_memory_deny_write_execute):
mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC, shmat with SHM_EXEC.
"""

from __future__ import annotations

import platform
import shutil
import sys

import pytest

CAP_NET_ADMIN_MASK = 1 << 12  # bit of CAP_NET_ADMIN in /proc/PID/status Cap* lines

# Installs the filter, then execs argv[1:]: the filter (and no_new_privs) survive execve.
_MDWE_EXEC = r"""
import ctypes, os, struct, sys
EPERM, AUDIT_ARCH_X86_64 = 1, 0xC000003E
SYS_MMAP, SYS_MPROTECT, SYS_SHMAT, SYS_PKEY_MPROTECT = 9, 10, 30, 329
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, ALU|AND|K, RET|K
ALLOW, DENY = 0x7FFF0000, 0x00050000 | EPERM
ARCH, NR, ARG2 = 4, 0, 32  # offsets in struct seccomp_data (args[2], low word)

def op(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)

def deny_if(mask):  # 5 instructions: deny when (args[2] & mask) == mask
    return [op(LD, ARG2), op(AND, mask), op(JEQ, mask, 0, 1), op(RET, DENY), op(RET, ALLOW)]

prog = [
    op(LD, ARCH), op(JEQ, AUDIT_ARCH_X86_64, 1, 0), op(RET, ALLOW),
    op(LD, NR),
    op(JEQ, SYS_MMAP, 4, 0),            # -> 9
    op(JEQ, SYS_MPROTECT, 8, 0),        # -> 14
    op(JEQ, SYS_PKEY_MPROTECT, 7, 0),   # -> 14
    op(JEQ, SYS_SHMAT, 11, 0),          # -> 19
    op(RET, ALLOW),
    *deny_if(PROT_WRITE | PROT_EXEC),   # 9
    *deny_if(PROT_EXEC),                # 14
    *deny_if(SHM_EXEC),                 # 19
]
code = ctypes.create_string_buffer(b"".join(prog))

class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

fprog = SockFprog(len(prog), ctypes.addressof(code))
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    sys.exit(f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
    sys.exit(f"prctl(SECCOMP): {os.strerror(ctypes.get_errno())}")
os.execvp(sys.argv[1], sys.argv[1:])
"""


def unavailable_reason() -> str | None:
    """Why `unit_privileges` cannot be used here, or None."""
    if platform.machine() != "x86_64":
        return "the MemoryDenyWriteExecute filter here is written for x86-64 syscall numbers"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux)"
    return None


def unit_privileges(*command: str) -> list[str]:
    """`command`, run as masqd.service runs it: only CAP_NET_ADMIN, no new privileges, W^X."""
    return [
        "setpriv",
        "--bounding-set=-all,+net_admin",
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
        sys.executable,
        "-c",
        _MDWE_EXEC,
        *command,
    ]


_UNAVAILABLE = unavailable_reason()
needs_unit_privileges = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")
