"""The ``tailkd`` command line (also ``python -m tailkd_ray``).

Every subcommand that takes ``--config F`` accepts dotted overrides after it, e.g.
``tailkd distill --config jobs/configs/smoke.yaml loss.k=5 loss.beta=2 output_dir=runs/k5``.

A ``TailKDError`` (bad config, data, cache, vocabulary, cluster), also one raised inside a Ray worker, is
printed as one line ``tailkd <command>: <message>`` with exit status 2; ``tailkd --debug <command>`` or
``TAILKD_DEBUG=1`` prints the full traceback before it. Other exceptions propagate as tracebacks (bugs). An
interrupted command (Ctrl-C, SIGINT) prints one line saying how to resume and exits with status 130.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import yaml

from tailkd_ray.config import load_config, reference_markdown, resolve_local_paths, to_dict
from tailkd_ray.errors import ConfigError, TailKDError, find_tailkd_error
from tailkd_ray.runtime import configure_logging

EXAMPLES = {
    "demo": "tailkd demo --out runs/demo        # built-in corpus, teacher + 3 students, report.md",
    "score": "tailkd score --config jobs/configs/smoke.yaml summary.cache_dir=runs/cache",
    "distill": "tailkd distill --config jobs/configs/smoke.yaml loss.kind=tad loss.k=10 loss.beta=2",
    "tune": "tailkd tune --config jobs/configs/smoke.yaml tune.k=[5,10] tune.beta=[1,2]",
    "eval": "tailkd eval --config jobs/configs/smoke.yaml --student runs/smoke/student",
    "config": "tailkd config --config jobs/configs/smoke.yaml loss.k=5   # print the resolved config",
}

# The subcommands that run a pipeline on a config file, with their one-line help (``run`` dispatches them).
COMMANDS = {
    "score": "Teacher pass: write the summary cache to summary.cache_dir.",
    "distill": "Score (streamed or cached) and train the student end to end.",
    "tune": "Ray Tune search over loss.k and loss.beta sharing one teacher pass.",
    "eval": "Evaluate any student (data.val, generation.data, lm_eval.tasks); writes <student>_eval.json.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tailkd",
        description="Distil a causal LM into a smaller one with the tail-aware divergence (TAD) on Ray.",
        epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback too (also: environment TAILKD_DEBUG=1)")
    parser.add_argument("--log-level", default=os.environ.get("TAILKD_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"],
                        help="our log level (default info, or TAILKD_LOG_LEVEL); debug also brings back Ray's own "
                             "INFO records and progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="The embedded default end to end (local Ray, built-in corpus).",
                          epilog=f"example:\n  {EXAMPLES['demo']}", formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--task", choices=["pretrain", "math"], default="pretrain",
                      help="pretrain: built-in text (default); math: supervised, arithmetic word problems")
    demo.add_argument("--out", help="output directory (default: runs/demo, or runs/demo-math for --task math)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo's settings")

    for name in (*COMMANDS, "config"):
        help_text = COMMANDS.get(name, "Print the resolved, validated config as YAML.")
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"example:\n  {EXAMPLES[name]}\n\nconfig keys: tailkd config --reference",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", required=name != "config", help="YAML config file")
        if name == "eval":
            p.add_argument("--student", required=True, help="HF directory of the student to evaluate")
            p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks to run on "
                                                               "the student too (same as lm_eval.tasks=[...])")
        if name == "config":
            p.add_argument("--reference", action="store_true", help="print the config reference (Markdown)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. loss.beta=2")
    return parser


def error_line(command: str, error: TailKDError) -> str:
    """The one line the CLI prints for a user error (multi-line messages joined)."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    prefix = "invalid config: " if isinstance(error, ConfigError) else ""
    return f"tailkd {command}: {prefix}{message}"


def run(args: argparse.Namespace) -> Optional[dict]:
    """Run the parsed command; returns what to print as JSON (None: nothing)."""
    if args.command == "config" and args.reference:
        print(reference_markdown(), end="")
        return None
    if args.command == "config" and not _names_a_model(config := load_config(args.config, args.overrides)):
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return None
    # Imported only now, after configure_logging: Ray and huggingface_hub read their settings from the environment
    # when imported (and `tailkd --help` / `tailkd config` of a config without models need neither).
    from tailkd_ray.pipelines import demo, distill, evaluate, preflight, score, tune

    if args.command == "config":  # the checks every pipeline runs before work, placement aside (it needs Ray)
        preflight.check_inputs(resolve_local_paths(copy.deepcopy(config)))
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return None

    if args.command == "demo":
        out = args.out or ("runs/demo-math" if args.task == "math" else "runs/demo")
        demo.run_demo(out, [f"task={args.task}", *args.overrides])  # prints its own table; JSON would repeat it
        return None
    overrides = list(args.overrides)
    if getattr(args, "lm_eval", None):
        tasks = [task.strip() for task in args.lm_eval.split(",") if task.strip()]
        overrides.append(f"lm_eval.tasks={json.dumps(tasks)}")
    config = resolve_local_paths(load_config(args.config, overrides))
    if args.command == "score":
        return score.score(config)
    if args.command == "distill":
        return distill.distill(config)
    if args.command == "tune":
        return tune.run_tune(config)
    return evaluate.evaluate_student(config, str(Path(args.student).absolute()))


def _names_a_model(config) -> bool:
    return config.teacher.model is not None or config.student.model is not None


# What running the same command again does after an interruption (Ctrl-C / SIGINT).
RESUME = {
    "distill": "to resume from the latest checkpoint (same output_dir and train.run_name)",
    "score": "to resume the teacher pass (same summary.cache_dir; finished shards are kept)",
    "tune": "to resume the search (same output_dir; finished trials are kept)",
    "demo": "to resume (what is finished is reused)",
    "eval": "to evaluate again",
    "config": "",
}


def interrupted_line(command: str) -> str:
    """The one line printed when a command is interrupted (exit status 130, as a shell reports SIGINT)."""
    return f"tailkd {command}: interrupted; run the same command again {RESUME[command]}".rstrip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        result = run(args)
    except (KeyboardInterrupt, SystemExit) as stop:
        # Ctrl-C: Python's KeyboardInterrupt, or, during training, Ray Train's own SIGINT handler, which aborts the
        # run's workers and leaves ray.get by SystemExit. Nothing else in a command exits that way.
        if args.debug or os.environ.get("TAILKD_DEBUG", "") not in ("", "0"):
            traceback.print_exception(stop, file=sys.stderr)
        print(interrupted_line(args.command), file=sys.stderr)
        return 130
    except Exception as error:
        user_error = find_tailkd_error(error)  # also when Ray wrapped it on the way from a worker
        if user_error is None:
            raise
        if args.debug or os.environ.get("TAILKD_DEBUG", "") not in ("", "0"):
            traceback.print_exception(error, file=sys.stderr)
        print(error_line(args.command, user_error), file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
