"""Run untrusted, model-written Python in a separate, limited process.

RESD executes whatever the policy writes, thousands of times, on the training host. The
sandbox must therefore survive accidents (infinite loops, huge allocations, floods of
output) and the kind of mischief a policy can stumble into under optimisation pressure
(`os.system`, forking, deleting files, killing its parent, reaching the network).

What it does, in layers, from strongest to weakest:

Kernel-enforced (always, on Linux):
    * a fresh `python -I` process of the current interpreter in its own session and
      process group, started in a fresh temporary directory that is deleted afterwards;
      the whole group is SIGKILLed on timeout and once the main process has exited, so
      nothing it spawned outlives the call;
    * resource limits: RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space, i.e. memory),
      RLIMIT_FSIZE (largest file it may write), RLIMIT_NOFILE, RLIMIT_CORE=0 and
      RLIMIT_NPROC. RLIMIT_NPROC is *not* enforced for root and counts every process of
      the user (not just the sandbox's), so it is only a backstop. The child sets the
      limits itself before any user code runs, rather than a `preexec_fn`, which runs
      Python between fork and exec and can deadlock a multi-threaded trainer;
    * stdout/stderr are streamed and capped in the parent: the head and the tail are
      kept, the middle is dropped, so 100 MB of output costs the host no memory;
    * a minimal environment (PATH, HOME and TMPDIR pointing at the work dir, a UTF-8
      locale); `-I` also ignores PYTHON* variables and the user site directory.

Kernel-enforced where the kernel permits it (silently skipped otherwise; the layers
that were active are reported in `SandboxResult.isolation`):
    * "netns": a new, empty network namespace (`unshare(CLONE_NEWNET)`; needs root or
      unprivileged user namespaces): no interface but a down loopback, so no network
      even for code that gets past the Python guards;
    * "seccomp": a seccomp-bpf filter (x86-64 and aarch64) that makes fork/vfork/
      non-thread clone/execve fail with EPERM, confines kill/tgkill to the process
      itself, forbids ptrace, process_vm_*, pidfd signalling and raising rlimits, and
      only allows AF_UNIX sockets. This is what stops a fork bomb when running as root,
      where RLIMIT_NPROC does nothing.

Python-level guard (an audit hook, PEP 578, plus a few patched functions), which gives
clear error messages but is *a guard, not a jail*: it stops naive and accidental harm,
while a deliberate exploit of the interpreter could get past it:
    * writes, deletions, renames, chmod/chown etc. of paths outside the work dir raise
      PermissionError (paths are resolved through symlinks; reads are allowed anywhere,
      so the stdlib can load). There is no kernel-level filesystem jail: if the guard is
      bypassed, the process can write wherever its user may;
    * process creation (fork, exec, spawn, subprocess, os.system), signals to other
      processes, non-AF_UNIX sockets, DNS, ctypes, gc introspection (which could reach
      the hook list) and sub-interpreters are refused.

Not covered: disk usage by many files (each file is capped by RLIMIT_FSIZE, but not
their number), reading files the user may read, Unix-domain sockets on the filesystem
(refused by the Python guard only), CPU contention with the host, and attacks on the
kernel itself. Run training as an unprivileged user or in a container
when the stakes are higher than a research box.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["SandboxResult", "run_python"]

# First line the child writes to stderr, before any user code runs: which isolation
# layers are active. The parent strips it from the captured stderr.
_ISOLATION_MARK = "\x00resd-sandbox-isolation "
_MAIN_FILE = "main.py"

# Runs inside the child, before the user's code. Kept self-contained (stdlib only) and
# passed with `-c`, so the child never imports resd and the prelude cannot be shadowed
# by files in the work dir. The configuration travels as JSON in argv[1].
_BOOTSTRAP = r"""
import json as _json, os as _os, sys as _sys

def _resd_limits(rlimits):
    import resource
    for name, soft, hard in rlimits:
        res = getattr(resource, name, None)
        if res is None:
            continue
        try:
            _cur_soft, cur_hard = resource.getrlimit(res)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
            resource.setrlimit(res, (min(soft, hard), hard))
        except (ValueError, OSError):
            pass

def _resd_libc():
    import ctypes
    return ctypes, ctypes.CDLL(None, use_errno=True)

def _resd_unshare_net():
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    # root can unshare directly; others need a user namespace to hold the capability.
    flag_sets = [CLONE_NEWNET] if _os.geteuid() == 0 else [CLONE_NEWUSER | CLONE_NEWNET]
    for flags in flag_sets:
        try:
            if hasattr(_os, "unshare"):
                _os.unshare(flags)
                return True
            _ctypes, libc = _resd_libc()
            if libc.unshare(flags) == 0:
                return True
        except (OSError, AttributeError):
            pass
    return False

_RESD_SYSCALLS = {
    # machine -> (audit arch, syscall numbers)
    "x86_64": (0xC000003E, dict(fork=57, vfork=58, clone=56, clone3=435, execve=59,
        execveat=322, kill=62, tkill=200, tgkill=234, ptrace=101, process_vm_readv=310,
        process_vm_writev=311, pidfd_open=434, pidfd_send_signal=424, socket=41,
        setrlimit=160, prlimit64=302)),
    "aarch64": (0xC00000B7, dict(clone=220, clone3=435, execve=221, execveat=281,
        kill=129, tkill=130, tgkill=131, ptrace=117, process_vm_readv=270,
        process_vm_writev=271, pidfd_open=434, pidfd_send_signal=424, socket=198,
        setrlimit=164, prlimit64=261)),
}

# A classic-BPF program over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}.
# Instructions are (code, jump-if-true, jump-if-false, k). Each rule reads
# "if nr == N: <block that always returns>"; every syscall without a rule is allowed,
# so the filter only narrows what a plain Python program never needs.
def _resd_seccomp(allow_subprocess, allow_network):
    machine = _os.uname().machine
    if machine not in _RESD_SYSCALLS:
        return False
    arch, nr = _RESD_SYSCALLS[machine]
    LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06
    ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    def arg_lo(i): return 16 + 8 * i
    def arg_hi(i): return 20 + 8 * i
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, arch), (RET, 0, 0, ENOSYS), (LD, 0, 0, 0)]
    if machine == "x86_64":  # x32 ABI numbers alias the real ones with bit 30 set
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, EPERM)]
    def rule(name, block):
        if name in nr:
            prog.append((JEQ, 0, len(block), nr[name]))
            prog.extend(block)
    def only_if_arg0_in(values):
        values = sorted({v & 0xFFFFFFFF for v in values})
        block = [(LD, 0, 0, arg_lo(0))]
        for k, value in enumerate(values):
            block.append((JEQ, len(values) - k, 0, value))
        return block + [(RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)]
    deny = [(RET, 0, 0, EPERM)]
    me = _os.getpid()
    if not allow_subprocess:
        rule("fork", deny)
        rule("vfork", deny)
        # threads are clone(CLONE_THREAD); anything else is a new process
        rule("clone", [(LD, 0, 0, arg_lo(0)), (JSET, 1, 0, 0x00010000),
                       (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)])
        rule("clone3", [(RET, 0, 0, ENOSYS)])  # libc falls back to clone()
        rule("execve", deny)
        rule("execveat", deny)
        rule("kill", only_if_arg0_in([0, me, -me]))
        rule("tgkill", only_if_arg0_in([me]))
        rule("tkill", deny)
    for name in ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_open",
                 "pidfd_send_signal", "setrlimit"):
        rule(name, deny)
    if not allow_network:
        rule("socket", only_if_arg0_in([1]))  # AF_UNIX only
    # prlimit64 is also how libc *reads* limits: allow it only without a new limit
    rule("prlimit64", [(LD, 0, 0, arg_lo(2)), (JEQ, 0, 2, 0), (LD, 0, 0, arg_hi(2)),
                       (JEQ, 1, 0, 0), (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW)])
    prog.append((RET, 0, 0, ALLOW))
    try:
        ctypes, libc = _resd_libc()
        class Filter(ctypes.Structure):
            _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                        ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
        insns = (Filter * len(prog))(*[Filter(c, t, f, k) for c, t, f, k in prog])
        fprog = Prog(len(prog), insns)
        ul = ctypes.c_ulong
        if libc.prctl(38, ul(1), ul(0), ul(0), ul(0)) != 0:  # PR_SET_NO_NEW_PRIVS
            return False
        ptr = ctypes.cast(ctypes.pointer(fprog), ctypes.c_void_p)
        return libc.prctl(22, ul(2), ptr, ul(0), ul(0)) == 0  # PR_SET_SECCOMP, FILTER
    except (OSError, AttributeError):
        return False

def _resd_guard(workdir, allow_subprocess, allow_network):
    import stat as _stat
    root = _os.path.realpath(workdir)
    devices = {"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty"}
    write_flags = (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND)
    realpath, getpid, getpgid, getpgrp = (_os.path.realpath, _os.getpid, _os.getpgid,
                                          _os.getpgrp)
    state = {"busy": False}

    def resolve(path, dir_fd=None, follow=True):
        if isinstance(path, int):
            target = _os.readlink("/proc/self/fd/%d" % path)
            return target if target.startswith("/") else None  # pipes, sockets
        path = _os.fsdecode(path)
        if dir_fd not in (None, -1, -100) and not path.startswith("/"):
            path = _os.path.join(_os.readlink("/proc/self/fd/%d" % dir_fd), path)
        if path in devices:
            return None
        if not follow:  # the entry itself, not what a symlink points to
            head, tail = _os.path.split(_os.path.abspath(path))
            return _os.path.join(realpath(head), tail)
        return realpath(path)

    def check_path(event, path, dir_fd=None, follow=True):
        try:
            real = resolve(path, dir_fd, follow)
        except OSError:
            real = "?"
        if real is None or real == root or real.startswith(root + "/"):
            return
        raise PermissionError(
            "sandbox: %s outside the work directory is not allowed: %r" % (event, path))

    def deny(what):
        raise PermissionError("sandbox: %s is not allowed" % what)

    process_events = {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn",
                      "os.system", "subprocess.Popen", "os.startfile", "pty.spawn"}
    # event -> ((index of a path argument, index of its dir_fd argument or None), ...),
    # and whether the check follows a final symlink (open does; unlink and rename act
    # on the link itself)
    path_events = {
        "os.remove": (((0, 1),), False), "os.rmdir": (((0, 1),), False),
        "os.mkdir": (((0, 2),), False), "os.rename": (((0, 2), (1, 3)), False),
        "os.link": (((0, 2), (1, 3)), False), "os.symlink": (((1, 2),), False),
        "os.truncate": (((0, None),), True), "os.chmod": (((0, 2),), True),
        "os.lchmod": (((0, None),), False), "os.chown": (((0, 3),), True),
        "os.utime": (((0, 3),), True), "os.chflags": (((0, None),), True),
        "os.lchflags": (((0, None),), False), "os.setxattr": (((0, None),), True),
        "os.removexattr": (((0, None),), True), "os.mkfifo": (((0, 2),), False),
        "os.mknod": (((0, 3),), False), "shutil.rmtree": (((0, 1),), False),
        "shutil.copyfile": (((1, None),), True), "shutil.copymode": (((1, None),), True),
        "shutil.copystat": (((1, None),), True), "shutil.chown": (((0, None),), True),
        "shutil.move": (((0, None), (1, None)), False),
    }
    denied_events = {
        "gc.get_objects": "gc introspection", "gc.get_referrers": "gc introspection",
        "gc.get_referents": "gc introspection", "resource.setrlimit": "changing rlimits",
        "resource.prlimit": "changing rlimits",
        "cpython.PyInterpreterState_New": "creating sub-interpreters",
    }
    if not allow_network:
        denied_events.update({
            "socket.getaddrinfo": "DNS", "socket.gethostbyname": "DNS",
            "socket.gethostbyname_ex": "DNS", "socket.gethostbyaddr": "DNS",
            "socket.getnameinfo": "DNS", "socket.connect": "network access",
            "socket.bind": "network access", "socket.sendto": "network access",
            "socket.sendmsg": "network access",
        })
    denied_modules = {"_xxsubinterpreters", "_interpreters", "_testcapi", "_testinternalcapi",
                      "_ctypes"}

    def same_group(pid):
        if pid in (0, getpid()) or -pid == getpgrp():
            return True
        try:
            return getpgid(abs(pid)) == getpgrp()
        except OSError:
            return False

    def hook(event, args):
        if state["busy"]:
            return
        state["busy"] = True
        try:
            if event == "open":
                path, mode, flags = args
                writing = bool((flags or 0) & write_flags) or (
                    isinstance(mode, str) and any(c in mode for c in "wax+"))
                if writing and not isinstance(path, int):
                    check_path("writing", path)
            elif event in path_events:
                paths, follow = path_events[event]
                for i, fd_i in paths:
                    dir_fd = args[fd_i] if fd_i is not None and fd_i < len(args) else None
                    check_path(event, args[i], dir_fd, follow)
            elif event in process_events:
                if not allow_subprocess:
                    deny("starting processes (%s)" % event)
            elif event in ("os.kill", "os.killpg"):
                target = args[0] if event == "os.kill" else -args[0]
                if not same_group(target):
                    deny("signalling other processes")
            elif event == "socket.__new__" and not allow_network:
                if args[1] != 1:  # AF_UNIX, e.g. asyncio's self-pipe
                    deny("network access")
            elif event in denied_events:
                deny(denied_events[event])
            elif event.startswith("ctypes."):
                deny("ctypes")
            elif event == "import" and args[0] in denied_modules:
                deny("importing %s" % args[0])
        finally:
            state["busy"] = False

    _sys.addaudithook(hook)

    # A few escape hatches raise no audit event; replace them.
    def _refuse(*_a, **_k):
        deny("this call")
    import signal as _signal_mod, _signal
    for mod in (_signal_mod, _signal):
        if hasattr(mod, "pidfd_send_signal"):
            mod.pidfd_send_signal = _refuse
    if not allow_subprocess:
        import _posixsubprocess
        _posixsubprocess.fork_exec = _refuse

def _resd_main():
    cfg = _json.loads(_sys.argv[1])
    _sys.argv[:] = [cfg["main"]]
    _resd_limits(cfg["rlimits"])
    active = ["rlimits"]
    if not cfg["allow_network"] and _resd_unshare_net():
        active.append("netns")
    if cfg["seccomp"] and _resd_seccomp(cfg["allow_subprocess"], cfg["allow_network"]):
        active.append("seccomp")
    _resd_guard(cfg["workdir"], cfg["allow_subprocess"], cfg["allow_network"])
    active.append("audit")
    _os.write(2, (cfg["mark"] + _json.dumps(active) + "\n").encode())
    _sys.path.insert(0, cfg["workdir"])

    import builtins, linecache, traceback, types
    with open(cfg["main"], encoding="utf-8") as f:
        source = f.read()
    # Register the source so tracebacks show lines even if the code changes directory.
    linecache.cache[cfg["main"]] = (len(source), None, source.splitlines(True), cfg["main"])
    module = types.ModuleType("__main__")
    module.__file__ = cfg["main"]
    module.__builtins__ = builtins
    _sys.modules["__main__"] = module
    try:
        exec(compile(source, cfg["main"], "exec"), module.__dict__)
    except SystemExit:
        raise
    except BaseException as exc:  # print like Python would, minus the sandbox's frames
        report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        pending, seen = [report], set()
        while pending:
            te = pending.pop()
            if te is None or id(te) in seen:
                continue
            seen.add(id(te))
            te.stack[:] = [fr for fr in te.stack if fr.filename != "<string>"]
            pending += [te.__cause__, te.__context__]
        _sys.stderr.write("".join(report.format()))
        _sys.stderr.flush()
        _sys.exit(1)

_resd_main()
"""


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one sandboxed run.

    `returncode` is negative when the process died from a signal (e.g. -9 for SIGKILL,
    -24 for SIGXCPU when the CPU limit hit). `stdout`/`stderr` are decoded as UTF-8
    with replacement; when `output_truncated`, the middle of the stream that overflowed
    was replaced by a `[... N bytes omitted ...]` line and the head and tail kept.
    """

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    output_truncated: bool
    wall_s: float
    pid: int  # of the sandboxed process (also its process-group and session id)
    isolation: tuple[str, ...] = ()  # active layers: rlimits, netns, seccomp, audit

    @property
    def ok(self) -> bool:
        """True iff the program ran to completion and exited with status 0."""
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        """One line on how the run ended, in words a model can act on."""
        if self.timed_out:
            return f"timed out (killed after {self.wall_s:.1f} s)"
        if self.returncode is None:
            return "did not finish"
        if self.returncode >= 0:
            return f"exited with status {self.returncode}"
        sig = -self.returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        reasons = {
            signal.SIGXCPU: " (CPU time limit exceeded)",
            signal.SIGKILL: " (likely a resource limit)",
            signal.SIGSEGV: " (segmentation fault, possibly memory exhaustion)",
            signal.SIGXFSZ: " (file size limit exceeded)",
        }
        return f"killed by {name}{reasons.get(sig, '')}"


class _CappedStream:
    """Keeps the head and the tail of a byte stream within `limit` bytes.

    The tail matters as much as the head: tracebacks and result markers come last.
    """

    def __init__(self, limit: int) -> None:
        self.tail_limit = max(limit // 4, 0)
        self.head_limit = max(limit - self.tail_limit, 0)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_limit:
            self.tail += data
            if len(self.tail) > self.tail_limit:
                del self.tail[: len(self.tail) - self.tail_limit]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        if not self.truncated:
            return head + tail
        omitted = self.total - len(self.head) - len(self.tail)
        return f"{head}\n[... {omitted} bytes omitted ...]\n{tail}"


def _safe_relpath(name: str) -> str:
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep) or norm == ".":
        raise ValueError(f"sandbox: file name must be relative and inside the work dir: {name!r}")
    return norm


def _has_exited(pid: int) -> bool:
    """Has the child exited? Does not reap it, so its pid (= process-group id) stays
    reserved and killing the group afterwards cannot hit a recycled pid."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _remove_tree(path: str) -> None:
    """Delete the work dir even if the code made parts of it unreadable.

    Symlinks are skipped, never followed: the code may have planted links to the host's
    directories, and chmod through them would change permissions outside the work dir.
    """
    for dirpath, dirnames, _files in os.walk(path):
        for d in dirnames:
            sub = os.path.join(dirpath, d)
            if not os.path.islink(sub):
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int | None = 512,
    stdin: str | bytes | None = None,
    max_output_bytes: int = 1_000_000,
    files: Mapping[str, str | bytes] | None = None,
    max_file_mb: int = 16,
    max_processes: int = 64,
    allow_subprocess: bool = False,
    allow_network: bool = False,
) -> SandboxResult:
    """Run `code` as a Python program in a fresh, limited child process.

    Args:
        code: the program; it runs as `__main__` from `main.py` in the work dir.
        timeout_s: wall-clock limit; the whole process group is SIGKILLed when it passes.
            The CPU-time limit is set a little above it as a second line of defence.
        memory_mb: address-space limit (RLIMIT_AS); None for no limit. Exceeding it
            shows up as a MemoryError in the program, not as a crash of the host.
        stdin: data for the program's standard input (else it reads EOF).
        max_output_bytes: how much of stdout and of stderr (each) to keep.
        files: extra files to create in the work dir before the run, by relative name;
            the work dir is on `sys.path`, so `.py` files there are importable.
        max_file_mb: largest file the program may write (RLIMIT_FSIZE).
        max_processes: RLIMIT_NPROC; see the module docstring for why it is a backstop.
        allow_subprocess: let the program start processes (only for trusted code: the
            fork guards are lifted; the group is still killed at the end).
        allow_network: let the program use the network (only for trusted code: no
            network namespace, no socket guards).

    Never raises for anything the program does; raises only for bad arguments or if the
    interpreter cannot be started at all.
    """
    if os.name != "posix":
        raise RuntimeError("resd.envs.sandbox needs a POSIX system (Linux is fully supported)")
    if timeout_s <= 0:
        raise ValueError("sandbox: timeout_s must be positive")
    cpu_s = math.ceil(timeout_s) + 1
    rlimits: list[tuple[str, int, int]] = [
        ("RLIMIT_CPU", cpu_s, cpu_s + 1),
        ("RLIMIT_FSIZE", max_file_mb * 2**20, max_file_mb * 2**20),
        ("RLIMIT_NOFILE", 256, 256),
        ("RLIMIT_CORE", 0, 0),
        ("RLIMIT_NPROC", max_processes, max_processes),
    ]
    if memory_mb is not None:
        rlimits.append(("RLIMIT_AS", memory_mb * 2**20, memory_mb * 2**20))

    workdir = os.path.realpath(tempfile.mkdtemp(prefix="resd-sandbox-"))
    stdin_file = None
    proc: subprocess.Popen[bytes] | None = None
    sel = selectors.DefaultSelector()
    out, err = _CappedStream(max_output_bytes), _CappedStream(max_output_bytes)
    timed_out = False
    start = time.monotonic()
    try:
        with open(os.path.join(workdir, _MAIN_FILE), "w", encoding="utf-8") as f:
            f.write(code)
        for name, content in (files or {}).items():
            target = os.path.join(workdir, _safe_relpath(name))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as fb:
                fb.write(content.encode() if isinstance(content, str) else content)
        if stdin is not None:
            # A file rather than a pipe: no writer thread, no deadlock with our reads.
            stdin_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed in `finally`)
            stdin_file.write(stdin.encode() if isinstance(stdin, str) else stdin)
            stdin_file.seek(0)
        config = {
            "main": _MAIN_FILE,
            "workdir": workdir,
            "rlimits": rlimits,
            "allow_network": allow_network,
            "seccomp": True,
            "allow_subprocess": allow_subprocess,
            "mark": _ISOLATION_MARK,
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        start = time.monotonic()
        deadline = start + timeout_s
        # Limits are applied by the child itself, first thing, not in preexec_fn: a
        # preexec_fn runs Python between fork and exec, which can deadlock when the
        # host process has other threads (tokenizers, torch, data loaders).
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOTSTRAP, json.dumps(config)],
            cwd=workdir,
            env=env,
            stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        exited_at: float | None = None
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is not None and now - exited_at > 1.0:
                break  # something that escaped the group still holds the pipes
            for key, _ in sel.select(timeout=min(deadline - now, 0.1)):
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    key.data.feed(chunk)
                else:
                    sel.unregister(key.fileobj)
            if exited_at is None and _has_exited(proc.pid):
                # Main process is gone: whatever it left behind in its group dies now.
                exited_at = time.monotonic()
                _kill_group(proc.pid)
        if timed_out:
            _kill_group(proc.pid)
            _drain(sel, time.monotonic() + 1.0)
        # Pipes closed but process still running (it may have closed its own stdout).
        while not _has_exited(proc.pid):
            if time.monotonic() >= deadline:
                timed_out = True
                _kill_group(proc.pid)
                break
            time.sleep(0.01)
        _kill_group(proc.pid)  # leader is a zombie at most: its pgid is not reusable yet
        proc.wait()
    finally:
        if proc is not None and proc.returncode is None:
            _kill_group(proc.pid)
            proc.wait()
        for key in list(sel.get_map().values()):
            sel.unregister(key.fileobj)
        sel.close()
        if proc is not None:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if stdin_file is not None:
            stdin_file.close()
        _remove_tree(workdir)

    stderr = err.text()
    isolation: tuple[str, ...] = ()
    if stderr.startswith(_ISOLATION_MARK):
        first, _, stderr = stderr.partition("\n")
        with contextlib.suppress(ValueError):
            isolation = tuple(json.loads(first[len(_ISOLATION_MARK) :]))
    return SandboxResult(
        stdout=out.text(),
        stderr=stderr,
        returncode=proc.returncode,
        timed_out=timed_out,
        output_truncated=out.truncated or err.truncated,
        wall_s=time.monotonic() - start,
        pid=proc.pid,
        isolation=isolation,
    )


def _drain(sel: selectors.BaseSelector, until: float) -> None:
    """Read what killed processes left in the pipes (partial output is still evidence)."""
    while sel.get_map():
        remaining = until - time.monotonic()
        if remaining <= 0:
            return
        for key, _ in sel.select(timeout=remaining):
            chunk = os.read(key.fd, 1 << 16)
            if chunk:
                key.data.feed(chunk)
            else:
                sel.unregister(key.fileobj)
