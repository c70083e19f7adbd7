"""`resd serve`: serve a model over an OpenAI-compatible API and record feedback on it.

    RESD_API_KEY=secret resd serve --model qwen2.5-coder-0.5b --host 0.0.0.0 --port 8000
    resd serve --model runs/x --output-dir runs/serve            # loopback only, no key
    resd serve --model Qwen/Qwen3-0.6B --db postgresql+psycopg://u:pw@db/resd --learn learn.yaml

This module holds only the argument parser and the start-up; the web and database
packages are imported once the command runs, so `resd --help` works without them and a
missing one is one clear error naming `pip install 'resd[serve]'`. The learner
(`--learn`) is imported only when asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from resd.config import DTYPE_NAMES, check_device, first_line
from resd.rundir import SERVE_DB, eval_metric_problem, hold_folder, path_option
from resd.serve import SERVE_EXTRA_HINT, missing_extra

if TYPE_CHECKING:
    from resd.serve.store import Store


def add_serve_subcommand(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible API and record feedback"
    )
    serve.add_argument(
        "--model", required=True, help="Hugging Face id, local folder or bundled alias"
    )
    serve.add_argument("--served-model-name", default=None,
                       help="the name clients pass as `model` (default: --model)")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind; anything but loopback needs an API key")  # fmt: skip
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--output-dir", type=path_option, default="runs/serve",
                       help="where the SQLite database (resd.db) and the learner's files go")  # fmt: skip
    serve.add_argument("--db", type=path_option, default=None,
                       help="SQLAlchemy URL, or a path read as an SQLite file "
                       "(default: sqlite:///<output-dir>/resd.db)")  # fmt: skip
    serve.add_argument("--api-key-env", default="RESD_API_KEY",
                       help="environment variable holding the API key (unset: no auth)")  # fmt: skip
    serve.add_argument("--max-batch", type=int, default=8, help="requests per generation batch")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0,
                       help="how long the worker waits for more requests to batch")  # fmt: skip
    serve.add_argument("--max-new-tokens", type=int, default=256,
                       help="the longest reply (requests asking more are capped)")  # fmt: skip
    serve.add_argument("--max-prompt-tokens", type=int, default=2048,
                       help="longer prompts keep their end")  # fmt: skip
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000)
    serve.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPE_NAMES)],
                       help="the weights' dtype; auto: bfloat16 where the device has fast bf16 "
                       "kernels, else float32")  # fmt: skip
    serve.add_argument("--device", default="auto")
    serve.add_argument("--base-version", default="base",
                       help="the version id the loaded weights are recorded under")  # fmt: skip
    serve.add_argument("--learn", type=path_option, default=None, metavar="CONFIG",
                       help="also run the background learner with this config")  # fmt: skip
    serve.add_argument("--learn-min-rows", type=int, default=None, metavar="N",
                       help="feedback rows a learner step waits for (default: the config's batch_size)")  # fmt: skip
    serve.add_argument("--guard-metric", default="case_mean@k",
                       help="the held-out metric that gates serving a learner step (higher is better): "
                            "an accuracy such as case_mean@k, or rewards/<name> of a reward function")  # fmt: skip
    serve.add_argument("--guard-tolerance", type=float, default=0.0,
                       help="serve a step whose guard metric fell by at most this much")  # fmt: skip
    serve.add_argument("--log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug"])  # fmt: skip
    serve.set_defaults(fn=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the arguments, open the database, load the model, then serve.

    The order is cheapest first, so a typo costs no model load: the arguments (limits,
    names, device, then host and key), then the database (a bad `--db` is one error line),
    then the model. A start that fails before serving removes the SQLite files it
    created (never ones that were there), so a bad `--model` leaves no empty database."""
    try:
        import uvicorn

        from resd.serve.app import create_app, on_loopback
        from resd.serve.engine import GenerationEngine, ModelHolder, load_served_model
        from resd.serve.store import sqlite_url
    except ImportError as exc:
        if SERVE_EXTRA_HINT not in str(exc):  # raised by the import above, not by our modules
            exc = missing_extra(exc.name or "its web and database packages", exc)
        print(f"resd: error: {exc}", file=sys.stderr)
        return 2

    _check_args(args)
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None and not on_loopback(args.host):
        raise ValueError(
            f"--host {args.host}: a server reachable from other machines needs an API key; "
            f"set ${args.api_key_env} (or choose the variable with --api-key-env), or bind "
            "to 127.0.0.1"
        )
    output_dir = Path(args.output_dir)
    url = args.db or sqlite_url(output_dir / SERVE_DB)
    new_files = [f for f in _sqlite_files(url) if not f.exists()]
    made_dirs = _missing_dirs([output_dir, *(f.parent for f in new_files[:1])])
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--output-dir: cannot create {output_dir}: {exc}") from exc
    serving = False
    store = None
    learner = None
    let_go = None
    try:
        if args.learn:  # one learner per folder: a second would train on the same rows
            let_go = hold_folder(output_dir, "--output-dir")
        store = _open_store(url, "--db" if args.db else "--output-dir")
        _check_base_version(store, args.base_version, args.model)
        _check_listen(args.host, args.port)
        if args.learn:  # its config and environment, before the served model loads
            from resd.serve.learner import learner_config

            learner_config(args.learn, output_dir=output_dir, min_rows=args.learn_min_rows,
                           check_env=True)  # fmt: skip
        name = args.served_model_name or args.model
        served = load_served_model(
            args.model, version=args.base_version, name=name, dtype=args.dtype,
            device=args.device, max_length=args.max_prompt_tokens + args.max_new_tokens,
        )  # fmt: skip
        if args.base_version not in {v["id"] for v in store.versions()}:  # a restart keeps its row
            store.add_version(
                args.base_version, parent=None, step=0, note=f"loaded from {args.model}"
            )
        holder = ModelHolder(served)
        engine = GenerationEngine(
            holder, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
            max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
        )  # fmt: skip
        if args.learn:
            from resd.serve.learner import Learner  # only now: it is optional

            learner = Learner.from_config(
                args.learn, store=store, holder=holder, output_dir=output_dir,
                min_rows=args.learn_min_rows, guard_metric=args.guard_metric,
                guard_tolerance=args.guard_tolerance,
            )  # fmt: skip
            learner.start()
        app = create_app(holder, store, api_key=api_key, model_name=name, learner=learner,
                         max_body_bytes=args.max_body_bytes, engine=engine)  # fmt: skip
        base = f"http://{args.host}:{args.port}"
        if api_key is None:
            print(f"resd serve: no API key (${args.api_key_env} is unset): unauthenticated, "
                  f"so bound to {args.host} only", file=sys.stderr)  # fmt: skip
        # the holder's version, not the loaded one: a restarted learner has already
        # swapped in the version it last served
        print(f"resd serve: model {name!r} (version {holder.current().version}) at {base}/v1, "
              f"page {base}/, database {store.url}"
              + (f", learning with {args.learn}" if learner else ""), file=sys.stderr)  # fmt: skip
        server = uvicorn.Server(
            uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
        )
        serving = True
        _run_until_signalled(server)
    finally:
        if learner is not None:
            learner.stop()
        if store is not None:
            store.close()
        if not serving:  # a failed start: leave the folder as it was
            _remove_new(new_files, made_dirs)
        if let_go is not None:
            let_go()
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """The options a mistake in would otherwise surface only after the model loaded (a
    port out of range, a guard metric no evaluation has), or never (a body limit under 1
    refuses every POST with a 413; an empty served name falls back to --model's)."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port: must be from 1 to 65535, got {args.port}")
    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes: must be at least 1, got {args.max_body_bytes} "
                         "(every request body would be refused with a 413)")  # fmt: skip
    guard_problem = eval_metric_problem(args.guard_metric)
    if guard_problem:
        raise ValueError(f"--guard-metric: {guard_problem}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name: must not be empty (leave it out to serve "
                         "under --model's name)")  # fmt: skip
    # the engine's limits, here and one by one: the engine would refuse them only once
    # the model had loaded, all four in one sentence
    for option in ("max_batch", "max_new_tokens", "max_prompt_tokens"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')}: must be at least 1, "
                             f"got {getattr(args, option)}")  # fmt: skip
    # inf made a lone request wait for a full batch forever; nan compares false everywhere
    if not (math.isfinite(args.batch_wait_ms) and args.batch_wait_ms >= 0):
        raise ValueError(f"--batch-wait-ms: must be a finite number >= 0, got {args.batch_wait_ms}")
    # nan made the guard refuse every learner step; inf turned it off unannounced
    if not math.isfinite(args.guard_tolerance):
        raise ValueError(f"--guard-tolerance: must be a finite number, got {args.guard_tolerance}")
    if args.learn_min_rows is not None and args.learn_min_rows < 1:
        raise ValueError(f"--learn-min-rows: must be at least 1, got {args.learn_min_rows}")
    for option in ("base_version", "api_key_env"):  # a version id, a variable's name
        if not getattr(args, option).strip():
            raise ValueError(f"--{option.replace('_', '-')}: must not be empty")
    check_device(args.device, "--device")


def _check_base_version(store: Store, version: str, model: str) -> None:
    """A restart on the same database records its replies under `--base-version` again:
    only if that version was loaded from the same model, else the new model's replies
    (and the feedback the learner trains on) would be filed under the old model's id."""
    from resd.serve.engine import same_model

    for row in store.versions():
        note = row.get("note") or ""
        if row["id"] != version or not note.startswith("loaded from "):
            continue
        if same_model(note.removeprefix("loaded from "), model):  # also one folder, two names
            continue
        raise ValueError(f"--base-version: {version!r} is recorded in this database as "
                         f"{note}; this server loads {model}. Choose another --base-version "
                         "for it, or another --output-dir / --db")  # fmt: skip


def _check_listen(host: str, port: int) -> None:
    """Bind the address once and let it go: a port in use was found only after the model
    had loaded, when uvicorn bound it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        raise ValueError(f"--host/--port: cannot listen on {host}:{port}: {exc}") from exc


def _open_store(url: str, option: str) -> Store:
    """The Store, or a ValueError naming `option` for a URL no driver takes, a driver
    that is not installed or a file or server that is not a usable database: each a
    traceback otherwise, raised by SQLAlchemy or the driver before any request."""
    import sqlalchemy as sa

    from resd.serve.store import Store

    try:
        shown = sa.make_url(url).render_as_string(hide_password=True) if "://" in url else url
    except sa.exc.ArgumentError as exc:
        raise ValueError(f"{option}: not a database URL ({exc})") from exc
    try:
        return Store(url)
    except ModuleNotFoundError as exc:
        hint = {"psycopg": " (pip install 'psycopg[binary]')",
                "psycopg2": " (pip install 'psycopg[binary]' and use a postgresql+psycopg:// "
                "URL)"}.get(exc.name or "", "")  # fmt: skip
        raise ValueError(f"{option}: {shown}: its database driver {exc.name!r} is not "
                         f"installed{hint}") from exc  # fmt: skip
    except sa.exc.DBAPIError as exc:  # the driver's own words, without SQLAlchemy's footer
        raise ValueError(f"{option}: cannot open {shown}: {exc.orig}") from exc
    except sa.exc.SQLAlchemyError as exc:
        raise ValueError(
            f"{option}: cannot open {shown}: {first_line(exc) or type(exc).__name__}"
        ) from exc
    except OSError as exc:
        raise ValueError(f"{option}: cannot open {shown}: {exc}") from exc
    except ValueError as exc:  # SchemaVersionError: written by another resd
        raise ValueError(f"{option}: {exc}") from exc


def _sqlite_files(url: str) -> list[Path]:
    """The files an SQLite database at `url` consists of (none for other databases)."""
    import sqlalchemy as sa

    if "://" not in url:
        path = Path(url)
    else:
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            return []  # refused by _open_store
        if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
            return []
        path = Path(parsed.database)
    return [path, *(path.with_name(path.name + end) for end in ("-wal", "-shm", "-journal"))]


def _missing_dirs(folders: list[Path]) -> list[Path]:
    """The folders (and their ancestors) that do not exist yet, deepest first: what a
    failed start removes again if they are still empty."""
    missing = {d for f in folders for d in (f.absolute(), *f.absolute().parents) if not d.exists()}
    return sorted(missing, key=lambda d: len(d.parts), reverse=True)


def _remove_new(files: list[Path], made_dirs: list[Path]) -> None:
    """Remove the files a failed start created, then the folders it made (deepest first)
    that are empty again. Never raises: the start's own error is the one to report (a
    `--db` under a file, say, has no file to remove and cannot be looked for)."""
    for path in files:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    for folder in made_dirs:
        with contextlib.suppress(OSError):  # something else was written there: keep it
            folder.rmdir()


class _Signalled(Exception):
    """SIGINT or SIGTERM after uvicorn's graceful shutdown (see `_run_until_signalled`)."""


def _raise_signalled(signum: int, _frame: object) -> None:
    raise _Signalled(signum)


def _run_until_signalled(server: object) -> None:
    """Run uvicorn; return once it has shut down on Ctrl-C or SIGTERM.

    uvicorn drains open requests on a signal, then raises the signal again under the
    handlers it found: with Python's defaults that is a KeyboardInterrupt traceback for
    SIGINT and an abrupt exit for SIGTERM, skipping our `finally` (the learner's stop, the
    database's close). Our own handlers turn the re-raised signal into a clean return.
    """
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _raise_signalled) for sig in handled}
    try:
        server.run()  # type: ignore[attr-defined]
    except _Signalled:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
