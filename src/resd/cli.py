"""Command line: `resd train`, `resd envs`, `resd env-check`, `resd eval`, `resd compare`,
`resd merge`, `resd continual`, `resd report`, `resd serve`.

resd train --config configs/demo.yaml lr=1e-5 env_args.n_train=64
resd train --config configs/demo.yaml --resume
resd eval --model runs/x --env arithmetic --samples 4          # the final model (or runs/x/checkpoint-40)
resd compare --config configs/demo.yaml --algorithms resd,sdpo --seeds 0,1 --out runs/cmp
resd merge runs/cmp runs/cmp_node2 --out runs/cmp_all                # seeds run apart, one comparison
resd continual --config configs/continual.yaml
resd report runs/cmp
resd serve --model runs/x --port 8000                           # OpenAI-compatible API + feedback

The subcommands beyond train/envs/env-check live in their own modules, each with an
`add_<name>_subcommand(subparsers)`; this file only registers them.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys

from resd import __version__
from resd.analysis.compare import add_compare_subcommand
from resd.analysis.continual import add_continual_subcommand
from resd.analysis.eval_cli import add_eval_subcommand
from resd.analysis.merge import add_merge_subcommand
from resd.analysis.report import add_report_subcommand
from resd.config import ConfigError, defaults_yaml, load_config
from resd.envs.base import NotAScoreError
from resd.rundir import EVAL_KEYS, path_option, reward_keys
from resd.serve.command import add_serve_subcommand


def _print_config_help() -> None:
    print(defaults_yaml(), end="")


def cmd_train(args: argparse.Namespace) -> int:
    if args.help_config:
        _print_config_help()
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from resd.training.plan import describe_run

        print("\n".join(describe_run(cfg, resume=args.resume)))
        return 0
    # heavy imports only once the config is known to be good
    from resd.training.interrupts import checkpoint_on_signals
    from resd.training.trainer import Interrupted, Trainer

    trainer = Trainer(cfg, resume=args.resume)
    parallel = trainer.parallel
    code = 0
    with checkpoint_on_signals(trainer):
        try:
            summary = trainer.train()
        except Interrupted as exc:  # checkpointed after its step, on every rank
            if parallel.is_main:
                print(f"resd: {exc.saved}; `resd train ... --resume` continues the run",
                      file=sys.stderr)  # fmt: skip
            code = exc.exit_status
    parallel.close()  # every rank ended at the same step: the process groups go down together
    if not code and parallel.is_main:
        _print_summary(summary)
    if parallel.world_size > 1:
        # Past this point nothing is left to write, and the interpreter's own teardown of a
        # sharded model's process-group objects ended now and then in gloo's "terminate
        # called without an active exception" (SIGABRT), failing a finished run.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _print_summary(summary: dict) -> None:
    before, after = summary.get("eval_before"), summary.get("eval_after")
    steps = summary["steps"]
    print(f"\nrun directory: {summary['run_dir']}  ({steps} step{'' if steps == 1 else 's'})")
    if before and after:
        # the accuracies, then each reward function's mean where a list of them scores
        parts = [key for key in reward_keys([after]) if key in before]
        width = max(14, *(len(key) for key in parts)) if parts else 14
        print(f"{'metric':{width}s} {'before':>8s} {'after':>8s}")
        for key in (*EVAL_KEYS, *parts):
            print(f"{key:{width}s} {before[key]:8.3f} {after[key]:8.3f}")
        print(f"(k = {int(after['k'])} samples per item, {int(after['items'])} test items)")
    if summary.get("stopped_early"):
        print(f"stopped early: {summary['stopped_early']}")
    print(f"playbook: {summary['run_dir']}/playbook.md")


def _type_text(annotation: object) -> str:
    """An argument's type as its source spells it: `str`, not `<class 'str'>` (a module
    without `from __future__ import annotations` holds the classes themselves)."""
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def cmd_envs(args: argparse.Namespace) -> int:
    from resd.envs import BUILTIN_ENVS, resolve_env_class

    if args.env:  # one environment: what it is and the env_args it takes
        cls = resolve_env_class(args.env)
        print(f"{args.env}: {cls.description}\n\nenv_args (name: type = default):")
        for param in list(inspect.signature(cls).parameters.values()):
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                given = param.annotation is not param.empty
                kind = f": {_type_text(param.annotation)}" if given else ""
                default = "" if param.default is param.empty else f" = {param.default!r}"
                print(f"  {param.name}{kind}{default}")
        init = vars(cls).get("__init__")
        for doc in (vars(cls).get("__doc__"), getattr(init, "__doc__", None)):  # its own only
            if doc and not doc.startswith(f"{cls.__name__}("):  # a dataclass's made-up one
                print("\n" + inspect.cleandoc(doc))
        return 0
    for name in BUILTIN_ENVS:
        try:
            description = resolve_env_class(name).description
        except ValueError as exc:
            description = f"(unavailable: {exc})"
        print(f"{name:14s} {description}")
    return 0


def cmd_env_check(args: argparse.Namespace) -> int:
    """Score every reference answer (all must reach 1.0) and show a few prompts and feedback."""
    from resd.analysis.evaluation import safe_score
    from resd.config import env_arg_overrides
    from resd.envs import make_env
    from resd.envs.base import (
        REFERENCES_FROM,
        check_item_ids,
        checked_test_items,
        listed_items,
    )

    env_args = env_arg_overrides({}, args.overrides)
    env = make_env(args.env, env_args)
    train = listed_items(env, "training")
    check_item_ids(train, "training")
    test = checked_test_items(env)
    items = train + test
    if not items:
        print(f"{args.env}: no items (check its arguments)", file=sys.stderr)
        return 1
    with_ref = [it for it in items if it.reference is not None]
    bad = []
    for it in with_ref:
        s = safe_score(env, it, it.reference or "")
        if s.reward < 1.0 or s.score < 1.0:
            bad.append((it.id, s))
    print(f"{args.env}: {len(train)} train / {len(test)} test items; "
          f"{len(with_ref)} reference answers, {len(with_ref) - len(bad)} score 1.0")  # fmt: skip
    if not with_ref:  # say so: a check of nothing would pass as a scorer that works
        hint = f" ({REFERENCES_FROM})" if type(env).__name__ == "DatasetEnv" else ""
        print(f"  no item has a reference answer: the scorer was not tried on a right one{hint}")
    for item_id, s in bad[:10]:
        print(f"  FAIL {item_id}: reward={s.reward} score={s.score} feedback={s.feedback[:200]!r}")
    for it in items[: args.samples]:
        wrong = safe_score(env, it, "I am not sure.")
        print(
            f"\n--- {it.id}\n{it.prompt_text[:600]}\n[feedback on a non-answer] {wrong.feedback[:600]}"
        )
    return 1 if bad else 0


def _count(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resd", description="Reflection-Enhanced Self-Distillation"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"resd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (RESD or a baseline)")
    train.add_argument("--config", type=path_option, help="YAML config file")
    train.add_argument(
        "--resume", action="store_true", help="continue from the run's last checkpoint"
    )
    train.add_argument(
        "--help-config", action="store_true", help="list every config key and its default"
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="check the config, environment, model and "
        "tokenizer, print the run's schedule, and stop (nothing is loaded to train or written)",
    )
    train.add_argument(
        "overrides", nargs="*", help="key=value overrides (nested: env_args.path=...)"
    )
    train.set_defaults(fn=cmd_train)

    envs = sub.add_parser("envs", help="list built-in environments, or show one's env_args")
    envs.add_argument("env", nargs="?", help="a built-in name or module:Class: its env_args")
    envs.set_defaults(fn=cmd_envs)

    check = sub.add_parser("env-check", help="score reference answers and show sample feedback")
    check.add_argument("env", nargs="?", help="built-in name or module:Class")
    # `resd eval` takes its environment as --env: the same words work here
    check.add_argument("--env", dest="env_option", metavar="ENV", help="the same, as a flag")
    check.add_argument("overrides", nargs="*", help="environment arguments as key=value")
    check.add_argument("--samples", type=_count, default=3, help="items shown with feedback")
    check.set_defaults(fn=cmd_env_check)

    add_eval_subcommand(sub)
    add_compare_subcommand(sub)
    add_merge_subcommand(sub)
    add_continual_subcommand(sub)
    add_report_subcommand(sub)
    add_serve_subcommand(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with key=value words wherever they stand. argparse hands a `*`
    positional (a command's overrides, `resd eval`'s environment arguments) only the words
    before the first flag and refuses the rest, so `resd env-check arithmetic --samples 0
    seed=1` was an error while the same words in another order were not."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        pairs = next((getattr(args, name) for name in ("overrides", "env_args")
                      if isinstance(getattr(args, name, None), list)), None)  # fmt: skip
        if pairs is None or any(word.startswith("-") or "=" not in word for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        pairs.extend(extra)
    if args.command == "env-check":
        if args.env_option and args.env and "=" in args.env:  # a key=value, not a name
            args.overrides.insert(0, args.env)
            args.env = None
        given = [name for name in (args.env, args.env_option) if name is not None]
        # a blank name ("$ENV" unset) was no name: a TypeError traceback further on
        if len(given) != 1 or not given[0].strip():
            parser.error("env-check: name one environment (resd env-check NAME, or --env NAME)")
        args.env = given[0]
    return args


# What bad input raises: said in one line, without a traceback. Anything else is our bug.
USER_ERRORS = (ConfigError, ValueError, FileExistsError, FileNotFoundError, NotAScoreError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `env=mytasks:Capitals` (and scorers named `module:function`) import from the working
    # directory, as under `python -m resd`; a console script's path lacks it. Appended, so
    # that an installed package is never shadowed by a file of the same name here.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep our own progress bar readable
    try:
        return args.fn(args)
    except BrokenPipeError:
        # whoever read our output stopped (`resd train --help-config | head`): no traceback,
        # and nothing left for the interpreter to flush into the closed pipe at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a program killed by it
    except (KeyboardInterrupt, Exception) as exc:
        if _caused_by_ctrl_c(exc):  # no traceback; nothing past the last checkpoint is lost
            print("\nresd: interrupted (`resd train ... --resume` continues a run from its "
                  "last checkpoint, as the same `resd compare` or `resd continual` command "
                  "does)", file=sys.stderr)  # fmt: skip
            return 130
        if not isinstance(exc, USER_ERRORS):
            raise
        print(f"resd: error: {exc}", file=sys.stderr)
        return 2


def _caused_by_ctrl_c(exc: BaseException) -> bool:
    """Whether `exc` is a Ctrl-C or one lies behind it. Python and libraries can wrap it:
    on 3.11 one that lands while a dataclass is being defined (a module imported late, as
    the first checkpoint imports torch.distributed's) surfaces as a RuntimeError it caused."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


if __name__ == "__main__":
    sys.exit(main())
