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

Kernel-enforced where the kernel permits it (skipped otherwise; the layers that were
active are reported in `SandboxResult.isolation`):
    * "bwrap": when bubblewrap (`bwrap`) is on PATH and works here, the child runs in a
      new mount namespace in which the whole host filesystem is mounted read-only, the
      work dir is the one writable place (also HOME and TMPDIR), /dev is a minimal
      private one, and the network namespace is empty (`--unshare-net`). This is the
      kernel-level filesystem jail behind the Python guard below: a write that gets past
      the guard (a shell started with `allow_subprocess`, native code) fails with EROFS
      instead of changing the host. Whether bwrap works is probed once per process (it
      needs user namespaces, or root, and containers often forbid both); when it does
      not, the reason is kept (`bwrap_status()`, and a warning in the log) and the run
      falls back to the layers below. Running as root, bwrap is told to drop every
      capability, so the child cannot remount anything writable. One cost: bwrap reports
      a child killed by signal N as exit status 128 + N, which is mapped back to -N, so a
      program that itself exits with a status between 129 and 192 reads as killed;
    * "netns": a new, empty network namespace (`unshare(CLONE_NEWNET)`, or bwrap's;
      needs root or unprivileged user namespaces): no interface but a down loopback, so
      no network even for code that gets past the Python guards;
    * "seccomp": a seccomp-bpf filter (x86-64 and aarch64) that makes fork/vfork/
      non-thread clone/execve fail with EPERM, confines kill/tgkill to the process
      itself and its own group, forbids ptrace, process_vm_*, pidfd signalling and
      raising rlimits, and only allows AF_UNIX sockets. This is what stops a fork bomb
      when running as root, where RLIMIT_NPROC does nothing;
    * "landlock": Landlock rules (Linux 5.13 and later, no privileges needed) under
      which the process and everything it starts may write (create, change, truncate,
      remove, rename, link) only beneath the work dir, and to /dev/null and /dev/tty;
      elsewhere the kernel answers EACCES. Reads and execution stay free. This is the
      filesystem jail where bubblewrap cannot run, and the one thing behind the Python
      guard there; `run_python(..., landlock=False)` turns it off. On kernels before
      5.19 (Landlock ABI 1) a rename or link across two directories of the work dir is
      refused too; before 6.2 (ABI 3) truncate(2) outside it is not covered.

Python-level guard (an audit hook, PEP 578, plus a few patched functions), which gives
clear error messages but is *a guard, not a jail*: it stops naive and accidental harm,
while a deliberate exploit of the interpreter could get past it:
    * writes, deletions, renames, chmod/chown etc. of paths outside the work dir raise
      PermissionError (paths are resolved through symlinks; reads are allowed anywhere,
      so the stdlib can load). With neither bwrap nor Landlock there is no
      kernel-level filesystem jail: if the guard is bypassed, the process can write
      wherever its user may;
    * process creation (fork, exec, spawn, subprocess, os.system), signals to other
      processes, non-AF_UNIX sockets, DNS, ctypes, gc introspection (which could reach
      the hook list) and sub-interpreters are refused.

Not covered: disk usage by many files (each file is capped by RLIMIT_FSIZE, but not
their number; under bwrap also files in the private /dev/shm, which is memory),
reading files the user may read, Unix-domain sockets on the filesystem
(refused by the Python guard only), CPU contention with the host, and attacks on the
kernel itself. Run training as an unprivileged user or in a container
when the stakes are higher than a research box.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BwrapStatus", "SandboxResult", "bwrap_status", "run_python"]

log = logging.getLogger(__name__)

# First line the child writes to stderr, before any user code runs: which isolation
# layers are active. The parent strips it from the captured stderr.
_ISOLATION_MARK = "\x00resd-sandbox-isolation "
_MAIN_FILE = "main.py"

# Runs inside the child, before the user's code: `sandbox_child.py`, passed as text with
# `-c`, so the child never imports resd and the prelude cannot be shadowed by files in
# the work dir. The configuration travels as JSON in argv[1].
_BOOTSTRAP = Path(__file__).with_name("sandbox_child.py").read_text(encoding="utf-8")


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
    # of the process started, which leads its process group and session (under bwrap:
    # bwrap's monitor, whose child runs the code)
    pid: int
    isolation: tuple[str, ...] = ()  # active: bwrap, rlimits, netns, seccomp, landlock, audit

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


# ------------------------------------------------------------------ bubblewrap layer


@dataclass(frozen=True)
class BwrapStatus:
    """Whether runs get the bubblewrap filesystem layer here, and why not if they don't."""

    available: bool
    reason: str  # what the probe found: the binary and its version, or why it failed
    path: str | None = None
    args: tuple[str, ...] = ()  # mount options that worked (see `_BWRAP_VARIANTS`)


# Mount options to try, best first. Some container runtimes refuse a fresh /proc
# (masked paths); the host's /proc, bound read-only with the rest of /, still serves
# the guard's /proc/self/fd look-ups.
_BWRAP_VARIANTS: tuple[tuple[str, ...], ...] = (
    ("--dev", "/dev", "--proc", "/proc"),
    ("--dev", "/dev"),
)
_bwrap_lock = threading.Lock()
_bwrap_cache: BwrapStatus | None = None


def _bwrap_command(
    bwrap: str, mounts: tuple[str, ...], workdir: str, allow_network: bool
) -> list[str]:
    """bwrap's part of the command line: read-only host, writable work dir, no network.

    No `--new-session` and no PID namespace: the sandboxed process must stay in the
    process group that `run_python` kills as a whole.
    """
    command = [bwrap, "--ro-bind", "/", "/", *mounts, "--bind", workdir, workdir]
    command += ["--chdir", workdir, "--unshare-ipc", "--die-with-parent"]
    if not allow_network:
        command.append("--unshare-net")
    if os.geteuid() == 0:  # as root bwrap keeps capabilities unless told otherwise
        command += ["--cap-drop", "ALL"]
    return [*command, "--"]


def _probe_bwrap() -> BwrapStatus:
    path = shutil.which("bwrap")
    if path is None:
        return BwrapStatus(False, "bwrap is not on PATH (Debian: apt-get install bubblewrap)")
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return BwrapStatus(False, f"{path} --version failed: {exc}", path)
    failures = []
    # Check what a run relies on: the work dir is writable, the rest is not.
    check = (
        "import os\n"
        "open('probe', 'w').write('ok')\n"
        "try:\n"
        "    open('/resd-bwrap-probe', 'w')\n"
        "except OSError:\n"
        "    pass\n"
        "else:\n"
        "    os.remove('/resd-bwrap-probe')\n"
        "    raise SystemExit('the host filesystem is writable')\n"
    )
    for mounts in _BWRAP_VARIANTS:
        workdir = os.path.realpath(tempfile.mkdtemp(prefix="resd-bwrap-probe-"))
        try:
            command = _bwrap_command(path, mounts, workdir, allow_network=False)
            proc = subprocess.run(
                [*command, sys.executable, "-I", "-c", check],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
            )
            wrote = os.path.exists(os.path.join(workdir, "probe"))
        except (OSError, subprocess.SubprocessError) as exc:
            failures.append(f"{' '.join(mounts)}: {exc}")
            continue
        finally:
            _remove_tree(workdir)
        if proc.returncode == 0 and wrote:
            return BwrapStatus(True, f"{path} ({version or 'unknown version'})", path, mounts)
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        failures.append(f"{' '.join(mounts)}: {detail}")
    return BwrapStatus(False, f"{path} does not work here: " + "; ".join(failures), path)


def bwrap_status(refresh: bool = False) -> BwrapStatus:
    """Probe bubblewrap once per process (about 0.1 s) and remember the answer.

    Logs a warning the first time bwrap is installed but unusable, since that silently
    weakens the sandbox to the layers without it.
    """
    global _bwrap_cache
    with _bwrap_lock:
        if _bwrap_cache is None or refresh:
            _bwrap_cache = _probe_bwrap()
            if not _bwrap_cache.available and _bwrap_cache.path is not None:
                log.warning("sandbox: no filesystem jail: %s", _bwrap_cache.reason)
        return _bwrap_cache


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
    bwrap: bool | None = None,
    landlock: bool = True,
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
        bwrap: run inside bubblewrap's read-only view of the host (see the module
            docstring): None uses it when `bwrap_status()` says it works, True insists
            (RuntimeError with the reason if it does not work here), False never uses it.
        landlock: confine the program's writes to the work dir in the kernel where
            Landlock works (see the module docstring); False turns it off, for trusted
            code that must write elsewhere (the Python guard still refuses such writes).

    Never raises for anything the program does; raises only for bad arguments or if the
    interpreter cannot be started at all.
    """
    if os.name != "posix":
        raise RuntimeError("resd.envs.sandbox needs a POSIX system (Linux is fully supported)")
    if timeout_s <= 0:
        raise ValueError("sandbox: timeout_s must be positive")
    jail = bwrap_status() if bwrap is not False else None
    use_bwrap = jail is not None and jail.available
    if bwrap and not use_bwrap:
        raise RuntimeError(f"sandbox: bwrap=True, but {bwrap_status().reason}")
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
            "netns_ready": use_bwrap and not allow_network,  # bwrap --unshare-net made it
            "seccomp": True,
            "landlock": landlock,
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
        command = [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOTSTRAP, json.dumps(config)]
        if use_bwrap:
            assert jail is not None and jail.path is not None
            command = _bwrap_command(jail.path, jail.args, workdir, allow_network) + command
        proc = subprocess.Popen(
            command,
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
    isolation: tuple[str, ...] = ("bwrap",) if use_bwrap else ()
    if stderr.startswith(_ISOLATION_MARK):
        first, _, stderr = stderr.partition("\n")
        with contextlib.suppress(ValueError):
            isolation += tuple(json.loads(first[len(_ISOLATION_MARK) :]))
    returncode = proc.returncode
    if use_bwrap and returncode is not None and 128 < returncode <= 128 + 64:
        returncode = 128 - returncode  # bwrap's 128 + N for "killed by signal N"
    return SandboxResult(
        stdout=out.text(),
        stderr=stderr,
        returncode=returncode,
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
