"""Images in preference rows (issue #30, the data step): TRL's vision format read from JSONL (paths
relative to the file), Parquet and `datasets` (Image columns), in-memory rows (PIL images); every
bad image a one-line DataError naming file, row and field, or skipped and counted; `train` refuses
image rows rather than train on their text alone."""
from __future__ import annotations

import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from directpo.data.formats import DataError, Example, SkipReport, load_examples, message_text, ranking_to_pairs
from directpo.data.readers import Rows

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
TWO = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Left or right:"}, {"type": "image"}]}]


def _png(path, size=(4, 3), colour="red", fmt=None):
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _row(images, prompt=PROMPT, **extra):
    return {"images": images, "prompt": prompt, "chosen": [{"role": "assistant", "content": "red"}],
            "rejected": [{"role": "assistant", "content": "blue"}], **extra}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def pics(tmp_path):
    (tmp_path / "img").mkdir()
    return {"png": _png(tmp_path / "img" / "a.png", (4, 3)), "jpg": _png(tmp_path / "img" / "b.jpg", (5, 2), "blue")}


def test_jsonl_relative_paths_one_image_column_and_text_answers(tmp_path, pics):
    data = _jsonl(tmp_path / "d.jsonl", [
        _row(["img/a.png"]),
        {"image": str(pics["jpg"]), "prompt": PROMPT, "chosen": "blue", "rejected": "red"},  # absolute, text answers
        _row(["img/a.png", "img/b.jpg"], prompt=TWO)])
    ex = load_examples(data)
    assert [(r.width, r.height, r.format) for r in ex[0].images] == [(4, 3, "PNG")]
    assert ex[0].images[0].path == os.path.join(str(tmp_path), "img", "a.png")
    assert ex[0].images[0].nbytes == os.path.getsize(pics["png"])
    assert [(r.width, r.height, r.format) for r in ex[1].images] == [(5, 2, "JPEG")]
    assert ex[1].chosen == [{"role": "assistant", "content": "blue"}]
    assert [r.width for r in ex[2].images] == [4, 5]  # in placeholder order
    assert message_text(ex[0].prompt) == "What colour?"  # the placeholder is not text
    assert ex[0].prompt == PROMPT  # list content kept for the processor's chat template
    img = ex[2].images[1].open()  # decoded only now
    assert img.size == (5, 2) and img.getpixel((0, 0))[2] > 200


def test_references_not_pixels(tmp_path, pics):
    """A file-backed image is held as a path: nothing decoded at load time."""
    ex = load_examples(_jsonl(tmp_path / "d.jsonl", [_row(["img/a.png"])] * 3))
    assert all(r.pil is None and r.data is None for e in ex for r in e.images)


def test_rows_without_images_flatten_list_content(tmp_path):
    row = {"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}]}],
           "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    ex = load_examples(_jsonl(tmp_path / "d.jsonl", [row]))[0]
    assert ex.images == [] and ex.prompt == [{"role": "user", "content": "hi you"}]
    assert ex.chosen == [{"role": "assistant", "content": "a"}]


def test_in_memory_pil_and_bytes(pics):
    pil = Image.new("RGB", (7, 6), "green")
    raw = io.BytesIO()
    Image.new("L", (3, 9)).save(raw, format="PNG")
    ex = load_examples(Rows([_row([pil]), _row([{"bytes": raw.getvalue(), "path": None}]),
                             _row([{"path": str(pics["png"])}])]))
    assert ex[0].images[0].pil is pil and (ex[0].images[0].width, ex[0].images[0].height) == (7, 6)
    assert (ex[1].images[0].width, ex[1].images[0].height, ex[1].images[0].nbytes) == (3, 9, len(raw.getvalue()))
    assert ex[1].images[0].open().size == (3, 9)
    assert ex[2].images[0].width == 4


def _image_dataset(pics):
    datasets = pytest.importorskip("datasets")
    encoded = {"bytes": pics["jpg"].read_bytes(), "path": None}  # one by path, one embedded
    ds = datasets.Dataset.from_dict({"images": [[{"bytes": None, "path": str(pics["png"])}], [encoded]], "prompt": [PROMPT] * 2,
                                     "chosen": ["red", "blue"], "rejected": ["blue", "red"]})
    return ds.cast_column("images", datasets.Sequence(datasets.Image()))


def test_datasets_image_column_read_undecoded(pics, tmp_path):
    ds = _image_dataset(pics)
    ex = load_examples(Rows(ds))
    assert [(e.images[0].width, e.images[0].height) for e in ex] == [(4, 3), (5, 2)]
    assert all(e.images[0].pil is None for e in ex)  # the column's {"bytes", "path"}, not decoded PIL images
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ex = load_examples(str(tmp_path / "d.parquet"))
    assert [(e.images[0].width, e.images[0].format) for e in ex] == [(4, "PNG"), (5, "JPEG")]
    assert ex[1].images[0].data is not None and ex[1].images[0].open().size == (5, 2)


def test_ranking_to_pairs_keeps_images(tmp_path, pics):
    row = {"images": ["img/a.png"], "prompt": PROMPT, "responses": ["a", "b", "c"]}
    pairs = ranking_to_pairs(load_examples(_jsonl(tmp_path / "d.jsonl", [row])))
    assert len(pairs) == 3 and all(p.images and p.images[0].width == 4 for p in pairs)


# ----------------------------------------------------------------------------------------------
# Bad images: one line naming file, row and field; skipped and counted with on_invalid='skip'

def _bad_rows(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "text.jpg").write_text("hello")
    assistant = [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image"}]}]
    return [  # (row, field, kind, words in the message)
        (_row(["img/missing.png"]), "images[0]", "image_missing", "no such image file"),
        (_row(["empty.png"]), "images[0]", "image_empty", "0 bytes"),
        (_row(["corrupt.png"]), "images[0]", "image_unreadable", "not a readable image"),
        (_row(["img/a.png", "text.jpg"], prompt=TWO), "images[1]", "image_unreadable", "text.jpg"),
        (_row(["https://example.com/a.png"]), "images[0]", "image_url", "download the image first"),
        (_row(["img/a.png", "img/a.png"]), "images", "image_count", "2 images, but its prompt has 1"),
        (_row(["img/a.png"], prompt=TWO), "images", "image_count", "1 image, but its prompt has 2"),
        (_row([], prompt=PROMPT), "images", "image_count", "0 images"),
        (_row(["img/a.png"], prompt="What colour?"), "images", "image_count", "no {\"type\": \"image\"} placeholder"),
        (_row(["img/a.png"], prompt=assistant), "prompt[1]", "image_placeholder", "'assistant' turn"),
        ({**_row(["img/a.png"]), "chosen": [{"role": "assistant", "content": [{"type": "image"}]}]}, "chosen[0]",
         "image_placeholder", "'assistant' turn"),
        (_row([42]), "images[0]", "type", "expected an image"),
        (_row("img/a.png"), "images", "type", "expected a list of images"),
        (_row([{"bytes": "aGk="}]), "images[0]", "type", "'bytes' must be bytes"),
        ({**_row(["img/a.png"]), "image": "img/a.png"}, "image", "type", "not both"),
        (_row(["img/a.png"], prompt=[{"role": "user", "content": [{"type": "video"}]}]), "prompt[0].content[0]",
         "type", "content part"),
    ]


def test_bad_images_are_one_line_errors(tmp_path, pics):
    for i, (row, field, kind, words) in enumerate(_bad_rows(tmp_path)):
        data = _jsonl(tmp_path / f"bad{i}.jsonl", [_row(["img/a.png"]), row])
        with pytest.raises(DataError) as e:
            load_examples(data)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{data}, line 2, field '{field}': "), msg
        assert e.value.kind == kind and words in msg, msg


def test_zero_size_pil_image():
    with pytest.raises(DataError, match=r"row 1, field 'images\[0\]': an empty image \(0×0\)"):
        load_examples(Rows([_row([Image.new("RGB", (0, 0))])]))


def test_skip_counts_every_bad_image_row(tmp_path, pics):
    bad = _bad_rows(tmp_path)
    data = _jsonl(tmp_path / "mixed.jsonl", [_row(["img/a.png"])] + [r for r, *_ in bad] + [_row(["img/b.jpg"])])
    report = SkipReport()
    ex = load_examples(data, on_invalid="skip", report=report)
    assert [e.row for e in ex] == [0, len(bad) + 1]
    kinds = {}
    for _, _, kind, _ in bad:
        kinds[kind] = kinds.get(kind, 0) + 1
    assert dict(report.counts) == kinds and report.total == len(bad)


def test_train_refuses_image_rows(tmp_path, pics, tiny_tokenizer):
    from directpo.errors import UserValueError
    from directpo.training import TrainConfig
    from directpo.training.prepare import prepare_data

    data = _jsonl(tmp_path / "d.jsonl", [_row(["img/a.png"]), _row(["img/b.jpg"]),
                                         {"prompt": "p", "chosen": "a", "rejected": "b"}])
    cfg = TrainConfig(model="unused", data=data, max_length=64)
    with pytest.raises(UserValueError) as e:
        prepare_data(data, tiny_tokenizer, cfg, "train")
    assert str(e.value).startswith(f"images in {data} (2 rows), but unused is a text-only model: give a "
                                   "vision-language model")
    assert "\n" not in str(e.value)


def test_cli_train_refuses_image_rows(tmp_path, pics, tiny_model, capsys):
    from directpo.cli import main

    data = _jsonl(tmp_path / "d.jsonl", [_row(["img/a.png"])])
    assert main(["train", "--model", str(tiny_model), "--data", data, "--output-dir", str(tmp_path / "out"),
                 "--no-progress", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert f"images in {data} (1 row), but {tiny_model} is a text-only model" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_every_text_only_command_refuses_image_rows(tmp_path, pics, tiny_model, capsys):
    """`rm`, `sample`, `eval` and `bon` would compute on the text alone, the image placeholders
    dropped: each refuses in one line (exit 2) naming the commands that do read images; `score`
    reads them with a vision-language model and refuses a text-only one, as `train` does."""
    from directpo.cli import main

    data = _jsonl(tmp_path / "d.jsonl", [_row(["img/a.png"]), _row(["img/a.png"])])
    out = tmp_path / "out"
    argvs = {
        "rm": ["rm", "--model", str(tiny_model), "--data", data, "--output-dir", str(out), "--no-progress"],
        "sample": ["sample", "--model", str(tiny_model), "--prompts", data, "--out", str(tmp_path / "x.jsonl")],
        "eval": ["eval", "--model", str(tiny_model), "--ref", str(tiny_model), "--prompts", data, "--out",
                 str(tmp_path / "e.jsonl"), "--reward-fn", "directpo.eval.scorers:review_sentiment"],
        "bon": ["bon", "--model", str(tiny_model), "--prompts", data, "--n", "2", "--out", str(tmp_path / "b.jsonl"),
                "--reward-fn", "directpo.eval.scorers:review_sentiment"],
    }
    for name, argv in argvs.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the precision line)
        assert err.startswith(f"directpo {name}: error: ") and "images" in err and "issue #30" in err and "d.jsonl" in err, (name, err)
        assert "train, sft, pipeline, score, inspect, sample, bon and eval" in err, (name, err)
        assert "Traceback" not in err
    score = ["score", "--model", str(tiny_model), "--data", data, "--out", str(tmp_path / "s.jsonl")]
    assert main(score) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"directpo score: error: images in {data} (2 rows), but --model {tiny_model} is a text-only "
                   "model: give a vision-language model (one with a vision tower) to score them, or remove the "
                   "'images'/'image' field to score the text alone")
    assert not (tmp_path / "s.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# Fuzz: whatever the image field holds, loading works or raises a DataError naming the file

FUZZ = settings(max_examples=int(os.environ.get("DIRECTPO_FUZZ_EXAMPLES", 80)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12), st.binary(max_size=24),
                    st.sampled_from(["img/a.png", "img/b.jpg", "img/", "", "http://x", "data:image/png;base64,AA",
                                     "/nonexistent.png", "~/x.png"]))
image_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["bytes", "path", "type"]), inner, max_size=3)), max_leaves=6)
parts = st.lists(st.one_of(st.just({"type": "image"}), st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=5)),
                           st.dictionaries(st.sampled_from(["type", "text"]), scalars, max_size=2)), max_size=3)


@FUZZ
@given(field=st.sampled_from(["images", "image"]), value=image_values, content=parts,
       role=st.sampled_from(["user", "assistant", "system"]))
def test_fuzz_image_field(tmp_path_factory, field, value, content, role):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "img").mkdir()
    _png(tmp / "img" / "a.png")
    row = {field: value, "prompt": [{"role": role, "content": content}], "chosen": "a", "rejected": "b"}
    path = tmp / "d.jsonl"
    try:
        line = json.dumps(row)
    except (TypeError, ValueError):  # bytes are not JSON: try the row in memory instead
        path, line = None, None
    if line is not None:
        path.write_text(line + "\n")
    spec = str(path) if path else Rows([row])
    try:
        ex = load_examples(spec)
    except DataError as e:
        assert str(e).startswith(str(spec)) and "\n" not in str(e)
        report = SkipReport()
        with pytest.raises(DataError, match="no usable rows"):
            load_examples(spec, on_invalid="skip", report=report)
        assert report.total == 1
        return
    assert isinstance(ex[0], Example)
    n = sum(isinstance(p, dict) and p.get("type") == "image" for p in content)
    assert len(ex[0].images) == n and all(r.width > 0 and r.height > 0 for r in ex[0].images)
