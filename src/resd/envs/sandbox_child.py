"""The sandbox's child prelude: runs inside the sandboxed process, before the user's code.

`resd.envs.sandbox.run_python` passes this file's text to a fresh ``python -I -c``, with
its configuration as JSON in argv[1]. It is self-contained (standard library only), so
the child never imports resd and files in the work folder cannot shadow it. It is never
imported by the trainer. It sets the resource limits, unshares the network, installs the
seccomp filter, the Landlock rules and the Python audit-hook guard, reports which layers
are active on the first line of stderr, then runs the user's file as ``__main__``.
"""

# ruff: noqa: UP031, RUF005, RUF012  (kept as it ran for years inside a string: %-formatting and class-level lists)

import json as _json
import os as _os
import sys as _sys


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
    "x86_64": (
        0xC000003E,
        dict(
            fork=57,
            vfork=58,
            clone=56,
            clone3=435,
            execve=59,
            execveat=322,
            kill=62,
            tkill=200,
            tgkill=234,
            ptrace=101,
            process_vm_readv=310,
            process_vm_writev=311,
            pidfd_open=434,
            pidfd_send_signal=424,
            socket=41,
            setrlimit=160,
            prlimit64=302,
        ),
    ),
    "aarch64": (
        0xC00000B7,
        dict(
            clone=220,
            clone3=435,
            execve=221,
            execveat=281,
            kill=129,
            tkill=130,
            tgkill=131,
            ptrace=117,
            process_vm_readv=270,
            process_vm_writev=271,
            pidfd_open=434,
            pidfd_send_signal=424,
            socket=198,
            setrlimit=164,
            prlimit64=261,
        ),
    ),
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

    def arg_lo(i):
        return 16 + 8 * i

    def arg_hi(i):
        return 20 + 8 * i

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
        rule(
            "clone",
            [
                (LD, 0, 0, arg_lo(0)),
                (JSET, 1, 0, 0x00010000),
                (RET, 0, 0, EPERM),
                (RET, 0, 0, ALLOW),
            ],
        )
        rule("clone3", [(RET, 0, 0, ENOSYS)])  # libc falls back to clone()
        rule("execve", deny)
        rule("execveat", deny)
        # itself, and its own group (under bwrap led by bwrap's monitor, not by it)
        rule("kill", only_if_arg0_in([0, me, -me, -_os.getpgrp()]))
        rule("tgkill", only_if_arg0_in([me]))
        rule("tkill", deny)
    for name in (
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "pidfd_open",
        "pidfd_send_signal",
        "setrlimit",
    ):
        rule(name, deny)
    if not allow_network:
        rule("socket", only_if_arg0_in([1]))  # AF_UNIX only
    # prlimit64 is also how libc *reads* limits: allow it only without a new limit
    rule(
        "prlimit64",
        [
            (LD, 0, 0, arg_lo(2)),
            (JEQ, 0, 2, 0),
            (LD, 0, 0, arg_hi(2)),
            (JEQ, 1, 0, 0),
            (RET, 0, 0, EPERM),
            (RET, 0, 0, ALLOW),
        ],
    )
    prog.append((RET, 0, 0, ALLOW))
    try:
        ctypes, libc = _resd_libc()

        class Filter(ctypes.Structure):
            _fields_ = [
                ("code", ctypes.c_ushort),
                ("jt", ctypes.c_ubyte),
                ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint),
            ]

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


# Landlock (Linux 5.13+, unprivileged): the filesystem jail where bubblewrap cannot run.
# Rights a write of any kind needs, by ABI version; reads and execution are not handled,
# so they stay free (the stdlib must load), as the Python guard leaves them.
_RESD_LANDLOCK_WRITES = (
    (1, (1 << 1) | (0x1FF << 4)),  # WRITE_FILE; REMOVE_DIR/FILE, MAKE_CHAR ... MAKE_SYM
    (2, 1 << 13),  # REFER: link and rename across directories (denied outright in ABI 1)
    (3, 1 << 14),  # TRUNCATE: truncate(2), and open with O_TRUNC
)
_RESD_LANDLOCK_WRITE_FILE = 1 << 1  # for a device: O_TRUNC does not apply to one
_RESD_LANDLOCK_DEVICES = ("/dev/null", "/dev/tty")  # the guard's writable devices


def _resd_landlock(workdir):
    """Confine every write, of this process and of all it starts, to the work dir (and
    /dev/null, /dev/tty) in the kernel, whatever happens to the Python guard. False
    where the kernel has no Landlock (or it is turned off), leaving the guard alone."""
    try:
        ctypes, libc = _resd_libc()
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        abi = syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
        if abi < 1:  # ENOSYS, or EOPNOTSUPP where the kernel has it turned off
            return False
        handled = sum(rights for version, rights in _RESD_LANDLOCK_WRITES if abi >= version)

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        def add_rule(ruleset, path, allowed):
            try:
                fd = _os.open(path, _os.O_PATH | _os.O_CLOEXEC)
            except OSError:
                return False
            try:
                rule = PathBeneath(allowed, fd)
                return syscall(ctypes.c_long(445), ctypes.c_int(ruleset), ctypes.c_int(1),
                               ctypes.byref(rule), ctypes.c_uint32(0)) == 0  # fmt: skip
            finally:
                _os.close(fd)

        ruleset_attr = ctypes.c_uint64(handled)  # struct landlock_ruleset_attr, ABI 1 size
        ruleset = syscall(ctypes.c_long(444), ctypes.byref(ruleset_attr), ctypes.c_size_t(8),
                          ctypes.c_uint32(0))  # fmt: skip
        if ruleset < 0:
            return False
        try:
            if not add_rule(ruleset, workdir, handled):
                return False
            for device in _RESD_LANDLOCK_DEVICES:  # one this host lacks is skipped
                add_rule(ruleset, device, _RESD_LANDLOCK_WRITE_FILE)
            ul = ctypes.c_ulong
            if libc.prctl(38, ul(1), ul(0), ul(0), ul(0)) != 0:  # PR_SET_NO_NEW_PRIVS
                return False
            return syscall(ctypes.c_long(446), ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0
        finally:
            _os.close(ruleset)
    except (OSError, AttributeError):
        return False


def _resd_guard(workdir, allow_subprocess, allow_network):
    root = _os.path.realpath(workdir)
    devices = {"/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty"}
    write_flags = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_TRUNC | _os.O_APPEND
    realpath, getpid, getpgid, getpgrp = (_os.path.realpath, _os.getpid, _os.getpgid, _os.getpgrp)
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
            "sandbox: %s outside the work directory is not allowed: %r" % (event, path)
        )

    def deny(what):
        raise PermissionError("sandbox: %s is not allowed" % what)

    process_events = {
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.exec",
        "os.spawn",
        "os.system",
        "subprocess.Popen",
        "os.startfile",
        "pty.spawn",
    }
    # event -> ((index of a path argument, index of its dir_fd argument or None), ...),
    # and whether the check follows a final symlink (open does; unlink and rename act
    # on the link itself; link may follow its source, and the event does not say)
    path_events = {
        "os.remove": (((0, 1),), False),
        "os.rmdir": (((0, 1),), False),
        "os.mkdir": (((0, 2),), False),
        "os.rename": (((0, 2), (1, 3)), False),
        "os.link": (((0, 2), (1, 3)), True),
        "os.symlink": (((1, 2),), False),
        "os.truncate": (((0, None),), True),
        "os.chmod": (((0, 2),), True),
        "os.lchmod": (((0, None),), False),
        "os.chown": (((0, 3),), True),
        "os.utime": (((0, 3),), True),
        "os.chflags": (((0, None),), True),
        "os.lchflags": (((0, None),), False),
        "os.setxattr": (((0, None),), True),
        "os.removexattr": (((0, None),), True),
        "os.mkfifo": (((0, 2),), False),
        "os.mknod": (((0, 3),), False),
        "shutil.rmtree": (((0, 1),), False),
        "shutil.copyfile": (((1, None),), True),
        "shutil.copymode": (((1, None),), True),
        "shutil.copystat": (((1, None),), True),
        "shutil.chown": (((0, None),), True),
        "shutil.move": (((0, None), (1, None)), False),
    }
    denied_events = {
        "gc.get_objects": "gc introspection",
        "gc.get_referrers": "gc introspection",
        "gc.get_referents": "gc introspection",
        "resource.setrlimit": "changing rlimits",
        "resource.prlimit": "changing rlimits",
        "cpython.PyInterpreterState_New": "creating sub-interpreters",
    }
    if not allow_network:
        denied_events.update(
            {
                "socket.getaddrinfo": "DNS",
                "socket.gethostbyname": "DNS",
                "socket.gethostbyname_ex": "DNS",
                "socket.gethostbyaddr": "DNS",
                "socket.getnameinfo": "DNS",
                "socket.connect": "network access",
                "socket.bind": "network access",
                "socket.sendto": "network access",
                "socket.sendmsg": "network access",
            }
        )
    denied_modules = {
        "_xxsubinterpreters",
        "_interpreters",
        "_testcapi",
        "_testinternalcapi",
        "_ctypes",
        # write_history_file() and friends write a path the audit events never show
        "readline",
    }

    def same_group(pid):
        """The program itself, its process group, or a process in that group other than
        the group's leader: under bwrap the leader is bwrap's monitor, not the program."""
        group = getpgrp()
        if pid in (0, getpid()) or pid == -group:
            return True
        if pid < 0 or pid == group:
            return False
        try:
            return getpgid(pid) == group
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
                    isinstance(mode, str) and any(c in mode for c in "wax+")
                )
                if writing and not isinstance(path, int):
                    check_path("writing", path)
            elif event == "sqlite3.connect":
                database = _os.fsdecode(args[0])  # str, bytes or a path object, as given
                if database.startswith("file:"):
                    deny("opening sqlite3 URIs")  # may name any file; plain paths suffice
                if database not in (":memory:", ""):
                    check_path("writing", database)
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

    # The "open" event carries no dir_fd, so the guard would check a dir_fd-relative
    # name against the cwd instead; os.open(name, flags, dir_fd=fd) (also reached as
    # open(..., opener=...)) is therefore refused whenever it may write.
    import posix as _posix

    _posix_open = _posix.open

    def _open(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None and flags & write_flags:
            deny("os.open for writing with dir_fd")
        return _posix_open(path, flags, mode, dir_fd=dir_fd)

    # os.mkfifo and os.mknod raise no audit event at all: check their path here.
    _posix_mkfifo, _posix_mknod = _posix.mkfifo, _posix.mknod

    def _mkfifo(path, mode=0o666, *, dir_fd=None):
        check_path("os.mkfifo", path, dir_fd, False)
        return _posix_mkfifo(path, mode, dir_fd=dir_fd)

    def _mknod(path, mode=0o600, device=0, *, dir_fd=None):
        check_path("os.mknod", path, dir_fd, False)
        return _posix_mknod(path, mode, device, dir_fd=dir_fd)

    for new, original in ((_open, _posix_open), (_mkfifo, _posix_mkfifo), (_mknod, _posix_mknod)):
        new.__doc__, new.__name__, new.__qualname__ = (original.__doc__,) + (original.__name__,) * 2
        setattr(_os, original.__name__, new)
        setattr(_posix, original.__name__, new)
        if original in _os.supports_dir_fd:  # the original must not be found there either
            _os.supports_dir_fd.discard(original)
            _os.supports_dir_fd.add(new)

    import _signal
    import signal as _signal_mod

    for mod in (_signal_mod, _signal):
        if hasattr(mod, "pidfd_send_signal"):
            mod.pidfd_send_signal = _refuse
    if not allow_subprocess:
        import _posixsubprocess

        _posixsubprocess.fork_exec = _refuse


def _resd_main():
    cfg = _json.loads(_sys.argv[1])
    _sys.argv[:] = [cfg["main"]]
    _os.environ.pop("PWD", None)  # bwrap adds it; the parent's environment has none
    _resd_limits(cfg["rlimits"])
    active = ["rlimits"]
    if not cfg["allow_network"] and (cfg["netns_ready"] or _resd_unshare_net()):
        active.append("netns")
    if cfg["seccomp"] and _resd_seccomp(cfg["allow_subprocess"], cfg["allow_network"]):
        active.append("seccomp")
    if cfg["landlock"] and _resd_landlock(cfg["workdir"]):
        active.append("landlock")
    _resd_guard(cfg["workdir"], cfg["allow_subprocess"], cfg["allow_network"])
    active.append("audit")
    _os.write(2, (cfg["mark"] + _json.dumps(active) + "\n").encode())
    _sys.path.insert(0, cfg["workdir"])

    import builtins
    import linecache
    import traceback
    import types

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


if __name__ == "__main__":
    _resd_main()
