"""Ranking metrics: one tie rule for every metric (a tie is never a correct ranking)."""
import pytest
import torch

from directpo.metrics import ranking_metrics

NAN = float("nan")


def test_a_tie_is_wrong_for_pairwise_accuracy_and_for_top1():
    r = torch.tensor([[1.0, 1.0, NAN], [2.0, 2.0, 0.0], [2.0, 0.0, 2.0], [2.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    m = ranking_metrics(r)
    # a tied pair is not a correct ranking ...
    assert m["accuracy"][0].item() == 0.0
    assert m["accuracy"][1].item() == pytest.approx(2 / 3)  # (0,1) tied: wrong; (0,2), (1,2) right
    # ... and neither is a tie at the top, wherever the tied rival is ranked
    assert m["top1"].tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]
    # a tie below the top does not matter to top-1
    assert m["kendall_tau"][3].item() == pytest.approx(2 / 3)


def test_pairwise_top1_equals_pairwise_accuracy():
    """For K = 2 top-1 and accuracy are the same question, ties included."""
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (64, 2), generator=g).float()  # many ties
    m = ranking_metrics(r)
    assert torch.equal(m["top1"], m["accuracy"])
    assert (r[:, 0] == r[:, 1]).any()


def test_rows_without_a_ranking_and_absent_responses():
    r = torch.tensor([[3.0, NAN, NAN], [3.0, NAN, 5.0], [3.0, NAN, 1.0]])
    m = ranking_metrics(r)
    assert m["top1"].tolist() == [0.0, 0.0, 1.0]  # one response: nothing to rank
    assert m["accuracy"].tolist() == [0.0, 0.0, 1.0]
    assert ranking_metrics(torch.tensor([[1.0], [2.0]]))["top1"].tolist() == [0.0, 0.0]
