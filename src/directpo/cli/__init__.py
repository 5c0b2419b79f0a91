"""`directpo <command>`: the command line, on top of everything and loaded lazily.

Each command group lives in its own module (`directpo.cli.train`, `.eval`, `.rlhf`, `.bench`,
`.experiment`, `.demo`, `.merge`) with a `register(command, parser)` that adds the command's flags and sets
`func`. Only the module of the command being run is imported, so `directpo --help` and
`directpo train --help` load neither the benchmark, the experiments, the RLHF code, TRL nor
matplotlib. Nothing below this package imports it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from .. import __version__
from ..errors import UserError
from .args import HelpFormatter

# command: (module in this package, one-line help). The order is the order of `directpo --help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train a policy with DPO (or another --loss) on preference data"),
    "sft": ("train", "supervised fine-tuning (Preferred-FT on the chosen responses of a preference set, or on "
                     "prompt/completion rows)"),
    "pipeline": ("train", "the paper's recipe: Preferred-FT on the chosen responses, then DPO from (and against) "
                          "that SFT model; resumable per stage"),
    "inspect": ("inspect", "a report on preference data, read as train reads it: shapes, invalid rows, duplicates, "
                           "length bias, truncation, tokenization, the reference's log-probs"),
    "score": ("eval", "log-probs (and implicit rewards, with --ref) of every pair in a file"),
    "sample": ("eval", "sample completions from a model for a prompt file (JSONL out)"),
    "bon": ("eval", "Best-of-N: N samples per prompt, scored, the best kept"),
    "eval": ("eval", "reward, KL(π‖πref), length and win rate of a policy on held-out prompts, over a "
                     "temperature sweep"),
    "merge": ("merge", "merge a LoRA adapter into its base: a Hugging Face model folder (safetensors shards, "
                       "config, tokenizer), written tensor by tensor"),
    "plan": ("plan", "the memory a run needs per device (weights, gradients, optimizer, activations), from the "
                     "model's config alone, and what makes it fit"),
    "plot": ("plot", "training curves of runs from their metrics.jsonl (loss, accuracy, margins, lr, ...), overlaid"),
    "rm": ("rlhf", "train a Bradley–Terry reward model (LM + scalar head) on preference pairs"),
    "ppo": ("rlhf", "PPO against a reward model or callable with a KL penalty to πref (eq. 3)"),
    "online": ("online", "online (iterative) DPO: sample from the policy, score, pair, train, repeat"),
    "demo": ("demo", "no-network demo: tiny model, built-in task, DPO, held-out reward accuracy"),
    "experiment": ("experiment", "the paper's experiments, end to end, with a report"),
    "bench": ("bench", "benchmark directpo against TRL's DPOTrainer on the same model and data"),
}


# argparse takes "-1e-4" for an option (its negative-number pattern has no exponent), so
# `--lr -1e-4` (or `-inf`) would fail with "expected one argument" instead of reaching the range check.
_NEGATIVE_NUMBER = re.compile(r"^-((\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


def make_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `directpo` parser. Every command is listed; only `command`'s flags are registered (its
    module imported), so building the parser for one command loads nothing of the others."""
    p = argparse.ArgumentParser(prog="directpo", description="Direct Preference Optimization for Hugging Face "
                                                               "causal LMs (Rafailov et al., 2023).")
    p.add_argument("--version", action="version", version=f"directpo {__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also: DIRECTPO_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        c = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        c._negative_number_matcher = _NEGATIVE_NUMBER
        if name == command:
            importlib.import_module(f"{__name__}.{module}").register(name, c)
    return p


def _command_of(argv: list[str]) -> str | None:
    """The command word: the first argument that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def is_user_error(e: BaseException) -> bool:
    """A mistake in the input, the settings or the environment, or a run stopped on purpose (it says
    why): one line, no traceback. `errors.UserError` (DataError, ConfigError, a diverged or
    interrupted run, ...), `OSError` (the user's files: FileNotFoundError, a full disk, ...) and
    exceptions marked `user_error = True`. A plain ValueError is a bug in directpo, not a mistake."""
    return isinstance(e, (UserError, OSError)) or getattr(e, "user_error", False)


def bug_report_line() -> str:
    """The line under the traceback of an error that is directpo's own."""
    return (f"directpo: this is a bug in directpo {__version__}, not a mistake in your input; please report it "
            "with the traceback above to the maintainers")


def _user_code_frame(e: BaseException) -> tuple[str, int] | None:
    """(file, line) of the innermost frame of `e`'s traceback in the user's own code (a --reward-fn
    module, a model's remote code) below directpo's last frame; None when the error rose from
    directpo itself, or from the libraries (installed packages, the standard library) it called."""
    import sysconfig
    import traceback

    package = os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep
    libraries = tuple({os.path.realpath(sysconfig.get_paths()[k]) + os.sep
                       for k in ("stdlib", "platstdlib", "purelib", "platlib")})
    found = None
    for frame, line in traceback.walk_tb(e.__traceback__):
        name = frame.f_code.co_filename
        path = os.path.realpath(name)
        if path.startswith(package):
            found = None  # whatever directpo called from here on
        elif not name.startswith("<") and not path.startswith(libraries):
            found = (name, line)
    return found


def report_line(e: BaseException) -> str:
    """The line under the traceback of an error that is not a user mistake: a bug in directpo, or
    an error raised in the user's own code that directpo called."""
    where = _user_code_frame(e)
    if where is None:
        return bug_report_line()
    return (f"directpo: the error above rose in your own code ({where[0]}, line {where[1]}), called by directpo; "
            "if that code is not at fault, please report it with the traceback above to the maintainers")


def main(argv: list[str] | None = None) -> int:
    if not _torchrun_worker():
        return _main(argv)
    try:
        code = _main(argv)
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # a bug: its traceback, as Python would print it, then the same exit status
        sys.excepthook(*sys.exc_info())
        code = 1
    _end_worker(code)


def _fewer_full_collections() -> None:
    """A command's setup (importing torch and transformers, loading, tokenizing) leaves ~10^6 long-lived
    objects, and CPython's cyclic collector rescans all of them at every full collection, reclaiming
    next to nothing: 0.73-0.89 s of GC in a `directpo train --max-steps 3` on 1,000 HH pairs (an ~8 s
    command; 3 runs). Here a full collection waits for 100 collections of the middle generation
    instead of 10; young cycles are collected as before: 0.16-0.18 s (3 runs). The command line owns
    its process; the library leaves a caller's settings alone."""
    import gc

    young, middle, full = gc.get_threshold()
    gc.set_threshold(young, middle, max(full, 100))


def _torchrun_worker() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def _end_worker(code: int) -> None:
    """A torchrun worker ends here, without the interpreter's teardown. Gloo's worker threads may
    still be releasing a finished collective (the final barrier holds the last all-gather's
    tensors), which takes the GIL; in an interpreter that is finalizing, that thread is killed and
    std::terminate aborts the process: exit -6 after a complete run, about one run in fifteen on a
    loaded 2-core machine (backtrace in the core: AsyncBarrierWork's destructor in
    ProcessGroupGloo::runLoop, take_gil -> pthread_exit; pytorch/pytorch#179291). Every file of the
    run is written and synced by now; what is left to flush is flushed."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    logging.shutdown()
    os._exit(code)


def _main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    _fewer_full_collections()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DIRECTPO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    args = make_parser(_command_of(argv)).parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"directpo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            # A bug: Python prints the traceback (exit status 1), the note last, under it; callers of
            # main() in-process still get the exception itself.
            note = report_line(e)
            if note not in getattr(e, "__notes__", ()):
                e.add_note(note)
            raise
        if debug:
            raise
        print(f"directpo {args.command}: {getattr(e, 'label', 'error: ')}{e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())
