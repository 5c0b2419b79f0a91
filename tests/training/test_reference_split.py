"""Reference log-prob tables computed by several processes, each its share (#17): under torchrun
(gloo, 2 CPU processes), with and without FSDP, the cached table equals the one a single process
computes, and each process ran forwards on half the examples (the padding aside).

Run as a torchrun script, this file counts the examples each rank's reference forwards see and
runs `directpo ARGS...` (the package carries no test hooks):

    python tests/training/test_reference_split.py COUNT_DIR ARGS...
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
N_TRAIN, N_EVAL = 21, 7  # odd: one rank's share is padded


def test_shares_cover_each_example_once_in_equal_counts():
    from types import SimpleNamespace

    from directpo.training.prepare import _shares

    examples = [SimpleNamespace(num_tokens=t) for t in (9, 3, 7, 1, 5, 8, 2)]
    own, padded = _shares(examples, 3)
    assert sorted(i for o in own for i in o) == list(range(7))
    assert [len(p) for p in padded] == [3, 3, 3]
    assert all(p[:len(o)] == o and p[len(o):] == [3] * (3 - len(o)) for o, p in zip(own, padded))  # 3: shortest
    tokens = [sum(examples[i].num_tokens for i in o) for o in own]
    assert max(tokens) - min(tokens) <= max(ex.num_tokens for ex in examples)
    own, padded = _shares(examples[:1], 2)  # fewer examples than ranks: no rank has an empty share
    assert own == [[0], []] and padded == [[0], [0]]


class _ThreadDist:
    """Rank `rank` of `world` threads: the collectives `_split_table` uses, over shared memory."""

    def __init__(self, rank: int, world: int, shared: dict):
        self.rank, self.world, self.main, self.enabled, self.shared = rank, world, rank == 0, True, shared

    def broadcast(self, tensor, shape=None):
        if self.main:
            self.shared["broadcast"] = tensor.clone()
        self.shared["barrier"].wait()
        out = self.shared["broadcast"].clone()
        self.shared["barrier"].wait()  # every rank has read it before the next broadcast
        return out

    def all_gather_rows(self, rows):
        assert self.shared.setdefault("shape", rows.shape) == rows.shape  # all_gather's fixed-size buffers
        self.shared[self.rank] = rows
        self.shared["barrier"].wait()
        return [self.shared[r] for r in range(self.world)]


def test_shares_of_mixed_rankings_are_gathered_into_one_table():
    """Rankings of 2 to 4 responses, the only 4 in rank 1's share: each rank's own table is as wide
    as its longest ranking, the gathered one as the widest of all, NaN where a row has no response;
    no example's row comes from the padding."""
    import threading
    from types import SimpleNamespace

    from directpo.training.prepare import _split_table

    ks = [2, 3, 2, 4, 2]  # by length: rank 0 takes 0, 2, 4 (K ≤ 2); rank 1 takes 1, 3
    examples = [SimpleNamespace(num_tokens=i, response_ids=[[i]] * k, id=i) for i, k in enumerate(ks)]
    seen: dict[int, list[int]] = {}

    def compute(exs, what):
        r = threading.current_thread().rank
        seen[r] = [ex.id for ex in exs]
        out = torch.full((len(exs), max(len(ex.response_ids) for ex in exs)), float("nan"))
        for row, ex in enumerate(exs):  # + 0.5 × rank: a padding row that overwrote a real one would show
            out[row, :len(ex.response_ids)] = torch.arange(len(ex.response_ids)) - 10.0 * ex.id + 0.5 * r
        return out

    shared, results = {"barrier": threading.Barrier(2)}, {}

    def rank(r):
        threading.current_thread().rank = r
        results[r] = _split_table(_ThreadDist(r, 2, shared), examples, "train", compute, None)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]  # no hang outlives it
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen == {0: [0, 2, 4], 1: [1, 3, 0]}  # rank 1 padded with the shortest example
    expected = torch.full((5, 4), float("nan"))
    for i, k in enumerate(ks):
        expected[i, :k] = torch.arange(k) - 10.0 * i + 0.5 * (i % 2)
    assert torch.equal(results[0].isnan(), expected.isnan()) and torch.equal(results[0].nan_to_num(),
                                                                            expected.nan_to_num())
    assert torch.equal(results[1].nan_to_num(), results[0].nan_to_num())


def _rows(tmp_path: Path, ranking: bool) -> tuple[Path, Path]:
    """Train and eval files: pairs, or rankings of 3 responses. (Rankings of mixed lengths are
    `test_shares_of_mixed_rankings_are_gathered_into_one_table`'s, and training on them with a
    precomputed table is test_loop's `test_precomputed_reference_on_rankings_of_mixed_lengths`.)"""
    from directpo.toy import ranked_review_task, review_task, write_jsonl

    if ranking:
        tr, ev, _ = ranked_review_task(n_train=N_TRAIN, n_eval=N_EVAL, k=3, seed=5)
    else:
        tr, ev = review_task(n_train=N_TRAIN, n_eval=N_EVAL, seed=5)
    return write_jsonl(tr[:N_TRAIN], tmp_path / "train.jsonl"), write_jsonl(ev[:N_EVAL], tmp_path / "eval.jsonl")


def _single_process_table(model_dir: Path, data: Path, loss: str) -> tuple[str, list, torch.Tensor]:
    """(model fingerprint, examples, table) of the reference log-probs one process computes, as
    `train` prepares them."""
    from directpo.data import make_collate
    from directpo.logprobs import dataset_logps, packed_row_tokens
    from directpo.models import load_model, load_tokenizer
    from directpo.reference import model_fingerprint
    from directpo.training import TrainConfig
    from directpo.training.prepare import prepare_data

    tok = load_tokenizer(str(model_dir))
    cfg = TrainConfig(model=str(model_dir), data=str(data), loss=loss, max_length=64, micro_batch_size=2)
    examples = prepare_data(str(data), tok, cfg, "single")[0]
    model = load_model(str(model_dir))
    collate = make_collate(cfg.layout, tok.pad_token_id, packed_row_tokens(cfg.row_tokens, model))
    return model_fingerprint(model), examples, dataset_logps(model, examples, collate, 2)


def _torchrun(argv: list[str]) -> str:
    """Run `argv` under torchrun with 2 processes; its stderr. A hang takes the launcher and its
    workers down together (they would outlive a killed launcher)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    p = subprocess.Popen([*TORCHRUN, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        err = p.communicate(timeout=300)[1]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    assert p.returncode == 0, err[-3000:]
    return err


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_each_process_computes_its_share_of_the_reference_table(tiny_model, tmp_path, mode):
    from directpo.reference import RowCache

    loss = "plackett_luce" if mode == "fsdp" else "dpo"
    train, evals = _rows(tmp_path, ranking=mode == "fsdp")
    counts, cache = tmp_path / "counts", tmp_path / "cache"
    # steps that draw every example (a run that draws fewer computes their rows alone); batches of
    # 6, 6, 6, 3: each rank's share of each batch is the same number of micro-batches (FSDP's lockstep)
    err = _torchrun([__file__, str(counts), "train", "--model", str(tiny_model), "--data", str(train),
                     "--eval-data", str(evals), "--loss", loss, "--batch-size", "6", "--micro-batch-size", "2",
                     "--max-steps", "4", "--max-length", "64", "--precision", "fp32", "--no-progress",
                     "--threads", "1", "--ref-cache", str(cache), "--output-dir", str(tmp_path / "run"),
                     *(["--fsdp"] if mode == "fsdp" else [])])
    assert f"reference log-probs (train): 2 processes computed {(N_TRAIN + 1) // 2} examples each" in err
    # each rank's forwards saw its half (eval table, then train table), padded to the same count
    seen = {r: json.loads((counts / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert seen[0] == seen[1] == [(N_EVAL + 1) // 2, (N_TRAIN + 1) // 2], seen
    for data in (evals, train):
        fingerprint, examples, single = _single_process_table(tiny_model, data, loss)
        # the rows a single process looks up: all there
        cached, missing = RowCache(cache, fingerprint, "fp32", print).lookup(examples)
        assert not missing
        assert cached.shape == single.shape and torch.equal(cached.isnan(), single.isnan())
        # float re-association only: a row's micro-batch companions, so its padding and matmul
        # shapes, differ from one process's (bit-identical on the CPU this was written on). The
        # log-probs reach -170, where fp32 steps are 1.5e-5: rtol 1e-6 allows about ten of them
        assert torch.allclose(cached, single, rtol=1e-6, atol=1e-5, equal_nan=True), \
            (cached - single).abs().nan_to_num().max()


def test_rows_rank0_finds_in_the_cache_are_not_computed_again(tiny_model, tmp_path):
    """A single-process `--max-steps 1` run caches the 6 rows its one batch draws; a 2-process run
    over the whole set then computes only the 15 others (each rank its share), and rank 0 sends the
    whole table round: every rank trains on the same numbers as the single process would."""
    from directpo.reference import RowCache
    from directpo.training import TrainConfig, train

    data, _ = _rows(tmp_path, ranking=False)
    counts, cache = tmp_path / "counts", tmp_path / "cache"
    train(TrainConfig(model=str(tiny_model), data=str(data), batch_size=6, micro_batch_size=2, max_steps=1,
                      max_length=64, precision="fp32", progress=False, ref_cache=str(cache),
                      output_dir=str(tmp_path / "one")))
    err = _torchrun([__file__, str(counts), "train", "--model", str(tiny_model), "--data", str(data),
                     "--batch-size", "6", "--micro-batch-size", "2", "--max-steps", "4", "--max-length", "64",
                     "--precision", "fp32", "--no-progress", "--threads", "1", "--ref-cache", str(cache),
                     "--output-dir", str(tmp_path / "two")])
    assert f"6 of {N_TRAIN} rows from the cache" in err and "15 computed and cached" in err
    seen = {r: json.loads((counts / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert seen[0] == seen[1] == [8], seen  # 15 rows, 8 a rank (one padded)
    fingerprint, examples, single = _single_process_table(tiny_model, data, "dpo")
    cached, missing = RowCache(cache, fingerprint, "fp32", print).lookup(examples)
    assert not missing and torch.allclose(cached, single, rtol=1e-6, atol=1e-5)
    # both ranks trained on that table: the 2-process run's metrics are the single process's
    two = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    train(TrainConfig(model=str(tiny_model), data=str(data), batch_size=6, micro_batch_size=2, max_steps=4,
                      max_length=64, precision="fp32", progress=False, ref_cache="off",
                      output_dir=str(tmp_path / "ref")))
    one = [json.loads(x) for x in open(tmp_path / "ref" / "metrics.jsonl")]
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    for a, b in zip(two, one):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-5


def _count_reference_forwards(count_dir: str) -> None:
    """Record, per rank, how many examples each reference table computation was given."""
    from directpo.training import prepare

    real = prepare.dataset_logps
    calls: list[int] = []

    def counting(model, examples, *args, **kwargs):
        calls.append(len(examples))
        Path(count_dir).mkdir(parents=True, exist_ok=True)
        (Path(count_dir) / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(calls))
        return real(model, examples, *args, **kwargs)

    prepare.dataset_logps = counting


if __name__ == "__main__":
    _count_reference_forwards(sys.argv[1])
    from directpo.cli import main

    sys.exit(main(sys.argv[2:]))
