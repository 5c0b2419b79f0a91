"""The directpo side of `directpo bench --end-to-end`: the user's `directpo train ...` command, whole,
with the seconds of its phases recorded.

    python -P e2e_directpo.py SPEC.json     (started by `end_to_end.py`; run as a file, not `-m`)

SPEC holds `argv` (the `directpo train` arguments), `t_launch` (the parent's `time.time()` just
before it started this process) and `result` (where to write the figures). The command runs as
`python -m directpo train ...` runs it (`runpy`: the package's own `__main__`), after timers are
wrapped around the stages `directpo.training.loop` calls, looked up by name in that module: load
(tokenizer, models), tokenize (data and its checks), reference (the reference log-prob pass),
steps (the step loop), save (the final model and tokenizer). Nothing in directpo's own code changes.
"""
import json
import resource
import sys
import time

# name in directpo.training.loop -> phase
STAGES = {"load_tokenizer": "load", "load_policy_and_reference": "load", "load_sharded": "load",
          "prepare_data": "tokenize", "check_data": "tokenize", "reference_tables": "reference",
          "run_steps": "steps", "finish": "save"}


def wrap_stages(module, seconds: dict) -> list[str]:
    """Time each of `STAGES` that `module` has into `seconds[phase]`; the names it lacks (a stage
    renamed: its time then shows as "other")."""
    depth = [0]  # a timed stage called inside another counts once, in the outer one

    def timed(fn, phase):
        def inner(*a, **kw):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t
        return inner

    missing = []
    for name, phase in STAGES.items():
        if hasattr(module, name):
            setattr(module, name, timed(getattr(module, name), phase))
        else:
            missing.append(name)
    return missing


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    import runpy

    import directpo.training.loop as loop  # what `directpo train` imports (its import time, counted as such)

    seconds = {"import": time.time() - spec["t_launch"]}
    missing = wrap_stages(loop, seconds)
    sys.argv = ["directpo", *spec["argv"]]
    rc = 0
    try:
        runpy.run_module("directpo", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open(spec["result"], "w") as f:
        json.dump({"rc": rc, "phases": seconds, "missing_stages": missing, "t_end": time.time(),
                   "peak_rss_mib": rss}, f)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
