"""The ``preftune`` command line: train, validate, show-config, experiment, generate, export."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .config import ConfigError, GenerationConfig, dump_yaml, load_train_config
from .training.signals import Terminated


def _add_config_args(p: argparse.ArgumentParser, what: str = "CONFIG.yaml") -> None:
    p.add_argument("config", metavar=what)
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config values")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import KINDS, METHOD_SECTIONS

    heading = {"pair": "from preference pairs", "unpaired": "from unpaired good/bad examples"}
    heading.update(reward_model="reward models", online="online, from prompts and reward functions")
    lines = ["methods (`method:` in a config; each has a section of the same name):"]
    for kind in KINDS:
        lines.append(f"  {heading[kind]}:")
        for name, section in METHOD_SECTIONS.items():
            if section.kind == kind:
                lines.append(f"    {name:<13} {section.summary}")
    parser = argparse.ArgumentParser(
        prog="preftune",
        description="Preference alignment for causal language models: offline pair and unpaired methods, "
        "reward models and online RL, from a YAML config to a trained model.",
        epilog="\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model from a YAML config")
    _add_config_args(p)
    p.add_argument(
        "--resume", action="store_true", help="continue from the run directory's latest checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        metavar="KEY",
        help="with --resume: accept a changed value of KEY (e.g. training.max_steps); repeatable",
    )
    p.add_argument(
        "--no-ref-cache",
        action="store_true",
        help="recompute reference log-probs instead of reusing an earlier run's (training.ref_cache=false)",
    )
    p = sub.add_parser("validate", help="check config, data and model; print what training would do")
    _add_config_args(p)
    p.add_argument("--no-model", action="store_true", help="skip loading the model weights")
    p.add_argument(
        "--num-processes",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "1")),
        help="plan the steps for this many processes (default: $WORLD_SIZE or 1)",
    )
    p = sub.add_parser("show-config", help="print the resolved config")
    _add_config_args(p)
    p = sub.add_parser(
        "experiment",
        help="run the controlled sentiment experiment (sample, score, pair, train, evaluate, plot)",
    )
    _add_config_args(p, "CONFIG.yaml|quick|sweep|paper|full|tune")
    p = sub.add_parser("generate", help="sample completions from a run directory or model, optionally scored")
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="run directory, model or adapter folder, hub id (default: embedded)",
    )
    p.add_argument(
        "--prompts", dest="prompts_file", metavar="FILE", help="prompt data (.jsonl/.txt/..., builtin:NAME)"
    )
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt; repeatable")
    p.add_argument("--chat", action="store_true", help="send --prompt texts as user messages (chat template)")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=GenerationConfig.max_new_tokens)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=GenerationConfig.batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument(
        "--reward", action="append", default=[], metavar="SPEC", help="score with a reward; repeatable"
    )
    p.add_argument("--out", metavar="FILE.jsonl", help="also write the rows as JSON Lines")
    p = sub.add_parser(
        "export",
        help="write a sharded checkpoint (training.sharding: fsdp) as an ordinary HF safetensors folder",
    )
    p.add_argument("checkpoint", metavar="RUN_DIR/checkpoints/step-N")
    p.add_argument("out_dir", metavar="OUT_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also follow options like --resume
    if args.command == "generate":
        return _generate(parser, args, extra)
    if args.command == "export":
        return _export(parser, args, extra)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    try:
        if args.command == "experiment":
            from .experiments.pipeline import load_experiment_config, run_experiment

            run_experiment(load_experiment_config(args.config, args.overrides))
            return 0
        overrides = list(args.overrides) + (
            ["training.ref_cache=false"] if getattr(args, "no_ref_cache", False) else []
        )
        cfg = load_train_config(args.config, overrides)
        if args.command == "show-config":
            print(dump_yaml(cfg.to_dict()), end="")
            return 0
        from .training import train, validate

        if args.command == "validate":
            summary = validate(cfg, load_weights=not args.no_model, num_processes=args.num_processes)
            plan = summary.pop("memory_plan", None)
            print(json.dumps(summary, indent=2))
            if plan is not None:
                from .training.memory import MemoryPlan

                print("\n".join(MemoryPlan.from_dict(plan).lines()))
            print(
                "ok: config and data are valid"
                + (" (model not loaded)" if args.no_model else "; model loaded")
            )
            return 0
        if args.allow_change and not args.resume:
            parser.error(
                "--allow-change only applies with --resume (it accepts a changed setting of a resumed run)"
            )
        run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_change)
        print(f"done: {run_dir}")
        return 0
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _export(parser, args, extra) -> int:
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .training.sharding import export

    try:
        export(args.checkpoint, args.out_dir, log=lambda *a: print(*a, file=sys.stderr))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"done: {args.out_dir}")
    return 0


def _generate(parser, args, extra) -> int:
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for flag, value in (("-n/--num-samples", args.num_samples), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size), ("--limit", args.limit)):  # fmt: skip
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    from .generate import generate, print_rows

    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        batch_size=args.batch_size,
    )
    try:
        rows = generate(
            args.model, prompts=args.prompt, prompts_file=args.prompts_file, chat=args.chat, n=args.num_samples,
            gen=gen, seed=args.seed, rewards=args.reward, limit=args.limit, out=args.out,
            log=lambda *a: print(*a, file=sys.stderr),
        )  # fmt: skip
    except (ConfigError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_rows(rows)
    scored = [r["reward"] for r in rows if r.get("reward") is not None]
    if scored:
        print(f"\nmean reward {sum(scored) / len(scored):.4f} over {len(scored)} completions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
