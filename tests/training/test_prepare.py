"""`training.prepare`: a row whose shape the loss does not take is named as every data error is, by
file and 1-based line (JSONL) or row, never by its 0-based index ("row 1" for line 2)."""
import pytest

from directpo.data.formats import DataError, load_examples, write_jsonl
from directpo.losses import get_loss
from directpo.training.config import TrainConfig
from directpo.training.prepare import preference_rows

PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("row,loss,message", [
    ({"prompt": "q", "completion": "c"}, "dpo", "line 2: the 'dpo' loss needs ≥ 2 responses per row"),
    ({"prompt": "q", "responses": ["a", "b", "c"]}, "dpo", "line 2: the 'dpo' loss takes pairs")])
def test_a_row_the_loss_refuses_is_named_by_its_line(tmp_path, row, loss, message):
    data = str(write_jsonl([PAIR, row], tmp_path / "d.jsonl"))
    cfg = TrainConfig(model="m", data=data, output_dir="o", loss=loss)
    with pytest.raises(DataError, match=rf"d\.jsonl, {message}"):
        preference_rows(load_examples(data), cfg, get_loss(loss))
