"""`directpo inspect --model VLM` on image pairs (issue #30): the rows read as `train` reads them
(the processor's expansion counted as image tokens per row, an image example shown with its image
tokens collapsed, the reference's log-probs = `directpo score`'s); without a vision-language model
the rows are measured by their text alone, as before."""
from __future__ import annotations

import json
import statistics

import pytest

from directpo.cli import main
from directpo.data import write_jsonl
from directpo.inspect import inspect_data
from directpo.models import load_tokenizer
from directpo.toy import COLOURS, build_tiny_vlm

TEXTS = [f"What colour is this picture? It is {c}." for c in COLOURS] * 8
ONE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this picture?"}]}]
TWO = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What colour?"}]}]
SIZES = {"a.png": (56, 56), "b.png": (112, 56), "c.png": (84, 140)}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    return {family: build_tiny_vlm(tmp_path_factory.mktemp(family), family, TEXTS, seed=0)
            for family in ("qwen2_vl", "llava")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Rows with one, two and one images of different sizes, and a text row."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("pics")
    for name, size in SIZES.items():
        Image.new("RGB", size, (200, 30, 30)).save(tmp / name)
    rows = [{"images": ["a.png"], "prompt": ONE, "chosen": "It is red.", "rejected": "It is blue."},
            {"images": ["b.png", "c.png"], "prompt": TWO, "chosen": "It is red.", "rejected": "It is green."},
            {"images": ["c.png"], "prompt": ONE, "chosen": "It is red.", "rejected": "It is green."},
            {"prompt": "What colour is red?", "chosen": "It is red.", "rejected": "It is blue."}]
    write_jsonl(rows, tmp / "d.jsonl")
    return tmp / "d.jsonl", rows


def _processor_counts(model_dir, folder, rows) -> list[int]:
    """Image tokens of each image row, straight from the processor on its own rendered prompt."""
    from PIL import Image

    from directpo.vision import load_processor

    proc = load_processor(str(model_dir))
    token = proc.tokenizer.convert_tokens_to_ids(proc.image_token)
    counts = []
    for row in rows:
        if "images" in row:
            text = proc.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            images = [Image.open(folder / name) for name in row["images"]]
            ids = proc(text=[text], images=[images], return_tensors="pt")["input_ids"][0].tolist()
            counts.append(ids.count(token))
    return counts


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_image_tokens_per_row_and_the_image_example(vlms, data, family, one_thread):
    from directpo.vision import load_processor

    path, rows = data
    model = str(vlms[family])
    ins = inspect_data(str(path), load_tokenizer(model), model=model, progress=False)
    counts = _processor_counts(vlms[family], path.parent, rows)
    assert all(counts)
    img = ins["images"]
    assert img["image_tokens_per_row"] == {"min": min(counts), "median": statistics.median(counts),
                                           "max": max(counts)}
    assert img["read_with"] == "the model's processor"
    assert not any("images" in f for f in ins["red_flags"])  # read with the images: nothing to warn about
    token = load_processor(model).image_token
    shown = ins["examples"]["images"]
    assert shown["row"] == 0
    assert f"{token}×{counts[0]}" in shown["chosen"] and token + token not in shown["chosen"]
    assert shown["chosen"].endswith("It is red.<|eos|>\n") and "What colour is this picture?" in shown["chosen"]
    assert shown["prompt_tokens"] == ins["per_pair"][0]["prompt_tokens"] > counts[0]
    assert "What colour is red?" in ins["examples"]["explicit"]["chosen"]  # the text row, as before


def test_reference_logps_are_scores(vlms, data, tmp_path, one_thread):
    """inspect's reference log-probs of image pairs are `directpo score`'s (the images read)."""
    from directpo.eval.score import score

    path, _ = data
    model = str(vlms["qwen2_vl"])
    ins = inspect_data(str(path), load_tokenizer(model), model=model, progress=False)
    score(model, str(path), str(tmp_path / "s.jsonl"), device="cpu", precision="fp32")
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [p["row"] for p in ins["per_pair"]] == [s["row"] for s in scored] == [0, 1, 2, 3]
    for p, s in zip(ins["per_pair"], scored):
        assert p["ref_chosen_logp"] == pytest.approx(s["chosen_logp"], abs=1e-5)
        assert p["ref_rejected_logp"] == pytest.approx(s["rejected_logp"], abs=1e-5)
    assert ins["reference"]["pairs"] == 4


def test_without_a_vision_model_the_text_alone(vlms, data, tiny_model, tiny_tokenizer):
    path, _ = data
    for ins in (inspect_data(str(path), tiny_tokenizer),  # --tokenizer alone
                inspect_data(str(path), load_tokenizer(str(vlms["llava"])))):  # a VLM's tokenizer, no --model
        assert ins["images"]["image_tokens_per_row"] is None and ins["images"]["read_with"] == "text alone"
        assert "images" not in ins["examples"]
        assert any("3 rows have images" in f for f in ins["red_flags"])


def test_cli_inspect_with_a_vision_model(vlms, data, tmp_path, capsys):
    path, rows = data
    out = tmp_path / "report"
    assert main(["inspect", "--data", str(path), "--model", str(vlms["llava"]), "--out", str(out),
                 "--no-progress"]) == 0
    counts = _processor_counts(vlms["llava"], path.parent, rows)
    console = capsys.readouterr().out
    want = f"image tokens per row (min / median / max): {min(counts)} / {statistics.median(counts)} / {max(counts)}"
    assert want in console
    md = (out / "report.md").read_text()
    assert f"<image>×{counts[0]}" in md
    assert json.loads((out / "report.json").read_text())["images"]["image_tokens_per_row"]["max"] == max(counts)
