"""Dataset loading: formats, round trips, images in every mode, benchmark mappings, and clear errors."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lite_srpo.data.tasks import Sample, load_benchmark, load_image, load_samples, make_task, write_jsonl
from lite_srpo.data.tasks.benchmarks import detect_benchmark, parse_option_string, split_choice_block
from lite_srpo.errors import ConfigError, DataError

W = "t.jsonl row 1"


def _png(colour=(200, 10, 10), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"))


def _same(a: list[Sample], b: list[Sample]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.question, x.answer, x.choices, x.meta) == (y.question, y.answer, y.choices, y.meta)
        assert [_pixels(i).tolist() for i in x.images] == [_pixels(i).tolist() for i in y.images]


def _write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def procedural() -> list[Sample]:
    return [s for name in ("count_shapes", "bar_compare", "gauge") for s in make_task(name, "test", 4, seed=5)]


# --- round trips -----------------------------------------------------------------------------------

def test_write_jsonl_round_trip(tmp_path, procedural):
    path = write_jsonl(procedural, tmp_path / "data" / "train.jsonl")
    loaded = load_samples(path)
    _same(procedural, loaded)
    assert [s.task for s in loaded] == [s.task for s in procedural]
    assert loaded[0].source == "train.jsonl:row 1"
    first = json.loads(path.read_text().splitlines()[0])
    assert first["image"] == "train_images/000000_0.png"  # relative: the folder can move
    assert len(load_samples(path, limit=3)) == 3
    assert {s.task for s in load_samples(path, task_name="mine")} == {"mine"}


def test_parquet_round_trip_with_embedded_bytes(tmp_path, procedural):
    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    table = pa.table({
        "image": [{"bytes": png(s.images[0]), "path": None} for s in procedural],
        "question": [s.question for s in procedural],
        "answer": [s.answer for s in procedural],
        "choices": [s.choices for s in procedural],
        "meta": [json.dumps(s.meta) for s in procedural],  # JSON-object strings are accepted for meta
    })
    pq.write_table(table, tmp_path / "d.parquet")
    _same(procedural, load_samples(tmp_path / "d.parquet"))


def test_save_to_disk_round_trip(tmp_path, procedural):
    import datasets  # pinned in requirements.txt: a broken install fails here, never skips
    ds = datasets.Dataset.from_dict(
        {"images": [s.images for s in procedural], "problem": [s.question for s in procedural],
         "answer": [s.answer for s in procedural]},
        features=datasets.Features({"images": datasets.List(datasets.Image()), "problem": datasets.Value("string"),
                                    "answer": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "one"))
    loaded = load_samples(tmp_path / "one")
    assert [s.question for s in loaded] == [s.question for s in procedural]
    assert all(np.array_equal(_pixels(a.images[0]), _pixels(b.images[0])) for a, b in zip(loaded, procedural))

    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(DataError, match="splits"):
        load_samples(tmp_path / "two")
    assert len(load_samples(tmp_path / "two" / "test")) == len(procedural)


def test_json_list_and_multi_image_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "b.png").write_bytes(_png((0, 0, 255)))
    rows = [
        {"image": ["a.png", "b.png"], "question": "Which is left?", "answer": 3},
        {"images": "b.png", "problem": "Alias fields?", "answer": 2.0, "choices": ["x", 5]},
        {"image": "a.png", "question": "Float?", "answer": 0.25},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    s = load_samples(tmp_path / "d.json")
    assert len(s[0].images) == 2 and tuple(_pixels(s[0].images[1])[0, 0]) == (0, 0, 255)
    assert [x.answer for x in s] == ["3", "2", "0.25"]
    assert s[1].question == "Alias fields?" and s[1].choices == ["x", "5"]


def test_image_root_overrides_the_data_folder(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(_png())
    data = _write_lines(tmp_path / "d.jsonl", [{"image": "a.png", "question": "q", "answer": "1"}])
    with pytest.raises(DataError, match="not found"):
        load_samples(data)
    assert load_samples(data, image_root=tmp_path / "pics")[0].images[0].size == (8, 6)


# --- bad inputs: DataError naming the file and row ---------------------------------------------------

def _bad(tmp_path: Path, name: str, content: bytes | list, *needles: str) -> str:
    path = tmp_path / name
    if isinstance(content, list):
        _write_lines(path, content)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_samples(path)
    message = str(err.value)
    for needle in (name, *needles):
        assert needle in message, message
    return message


def test_bad_rows_name_file_and_row(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = {"image": "ok.png", "question": "q", "answer": "1"}
    _bad(tmp_path, "noans.jsonl", [good, {"image": "ok.png", "question": "q"}], "row 2", "'answer'")
    _bad(tmp_path, "noq.jsonl", [good, good, {"image": "ok.png", "answer": "1"}], "row 3", "'question'")
    msg = _bad(tmp_path, "noimg.jsonl", [good, {**good, "image": "gone.png"}], "row 2", "gone.png", "not found")
    assert str(tmp_path) in msg  # says where it looked
    _bad(tmp_path, "unread.jsonl", [{**good, "image": "broken.png"}], "row 1", "unreadable")
    _bad(tmp_path, "json.jsonl", [good, '{"image": "ok.png",', good], "row 2", "invalid JSON")
    _bad(tmp_path, "notobj.jsonl", [good, "[1, 2]"], "row 2", "JSON object")
    _bad(tmp_path, "utf.jsonl", json.dumps(good).encode() + b"\n\n" + b'{"question": "caf\xe9"}\n', "row 3", "UTF-8")
    _bad(tmp_path, "blank.jsonl", [good, "", "   ", "{bad"], "row 4")  # blank lines still count
    _bad(tmp_path, "nan.jsonl", [{**good, "answer": float("nan")}], "row 1", "finite")
    _bad(tmp_path, "list.jsonl", [{**good, "answer": [1]}], "row 1", "answer")
    _bad(tmp_path, "choices.jsonl", [{**good, "choices": "A B"}], "row 1", "choices")
    _bad(tmp_path, "noimage.jsonl", [{"question": "q", "answer": "1"}], "row 1", "'image'")
    _bad(tmp_path, "emptyimgs.jsonl", [{**good, "image": []}], "row 1", "empty list")
    _bad(tmp_path, "d.json", json.dumps([good, 7]).encode(), "row 2")
    _bad(tmp_path, "d2.json", b"\xff\xfe[]", "UTF-8")
    _bad(tmp_path, "empty.jsonl", b"\n\n", "no rows")
    _bad(tmp_path, "garbage.parquet", b"PAR1 not parquet", "Parquet")
    _bad(tmp_path, "data.csv", b"a,b", "unsupported")


def test_missing_paths(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_samples(tmp_path / "nope.jsonl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_samples(tmp_path / "folder")
    with pytest.raises(ConfigError, match="limit"):
        load_samples(tmp_path / "nope.jsonl", limit=0)


def test_parquet_bad_row_names_the_row(tmp_path):
    pq.write_table(pa.table({"image": [{"bytes": _png(), "path": None}, {"bytes": b"junk", "path": None}],
                             "question": ["q", "q"], "answer": ["1", "2"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet row 2: embedded image bytes is unreadable"):
        load_samples(tmp_path / "x.parquet")


# --- images ----------------------------------------------------------------------------------------

def test_every_pil_mode_becomes_rgb():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    out = _pixels(load_image(rgba, where=W))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [255, 0, 0]  # transparent -> white

    la = Image.new("LA", (1, 1), (0, 0))
    assert _pixels(load_image(la, where=W))[0, 0].tolist() == [255, 255, 255]

    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255] + [0, 255, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    assert _pixels(load_image(p, where=W)).tolist() == [[[0, 0, 255], [0, 255, 0]]]
    p.info["transparency"] = 0  # palette index 0 is transparent -> white
    assert _pixels(load_image(p, where=W)).tolist() == [[[255, 255, 255], [0, 255, 0]]]

    assert _pixels(load_image(Image.new("L", (1, 1), 77), where=W))[0, 0].tolist() == [77] * 3
    assert _pixels(load_image(Image.new("1", (1, 1), 1), where=W))[0, 0].tolist() == [255] * 3
    cmyk = load_image(Image.new("CMYK", (1, 1), (0, 255, 255, 0)), where=W)
    assert _pixels(cmyk)[0, 0].tolist() == [255, 0, 0]

    # 16-bit: 65535 -> 255, 25700 = 100 * 257 -> 100
    i16 = Image.fromarray(np.array([[65535, 25700]], dtype=np.uint16))
    assert _pixels(load_image(i16, where=W))[0, :, 0].tolist() == [255, 100]
    # 32-bit I holding 16-bit data scales the same way; holding 0..255 stays
    assert _pixels(load_image(Image.fromarray(np.array([[65535, 0]], dtype=np.int32)),
                              where=W))[0, :, 0].tolist() == [255, 0]
    assert _pixels(load_image(Image.fromarray(np.array([[200, 3]], dtype=np.int32)),
                              where=W))[0, :, 0].tolist() == [200, 3]
    # float in [0, 1] -> x 255 (0.5 * 255 = 127.5 rounds to 128); other floats are min-max stretched
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert _pixels(load_image(f, where=W))[0, :, 0].tolist() == [0, 128, 255]
    f2 = Image.fromarray(np.array([[-10.0, 10.0]], dtype=np.float32))
    assert _pixels(load_image(f2, where=W))[0, :, 0].tolist() == [0, 255]


def test_sixteen_bit_png_file(tmp_path):
    Image.fromarray(np.array([[65535, 257]], dtype=np.uint16)).save(tmp_path / "g.png")
    im = load_image("g.png", where=W, root=tmp_path)
    assert im.mode == "RGB" and _pixels(im)[0, :, 0].tolist() == [255, 1]


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (0, 128, 0)).save(tmp_path / "o.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "o.jpg", where=W).size == (20, 40)


def test_truncated_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match=r"t\.jsonl row 1: image 'cut\.png' is unreadable or truncated"):
        load_image("cut.png", where=W, root=tmp_path)


def test_decompression_bomb_limit(tmp_path):
    with pytest.raises(DataError, match="over the limit of 5000"):
        load_image(_png(size=(100, 100)), where=W, max_pixels=5000)
    # 10000 x 10000 = 1e8 pixels > the 5e7 default: refused from the header, before decoding.
    Image.new("1", (10000, 10000)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match="10000x10000"):
        load_image(tmp_path / "big.png", where=W)


def test_image_reference_forms(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
    data_uri = "data:image/png;base64," + base64.b64encode(_png((1, 2, 3))).decode()
    for ref in (_png((1, 2, 3)), {"bytes": _png((1, 2, 3)), "path": "ignored.png"}, {"bytes": None, "path": "a.png"},
                "a.png", data_uri):
        assert _pixels(load_image(ref, where=W, root=tmp_path))[0, 0].tolist() == [1, 2, 3]
    for ref, needle in ((42, "must be a path"), ("https://x/y.png", "URL"), ({"path": None}, "neither"),
                        ("data:image/png;base64,@@@", "base64"), ("", "empty"), ("a\x00b.png", "not found")):
        with pytest.raises(DataError, match=needle):
            load_image(ref, where=W, root=tmp_path)


# --- benchmarks ------------------------------------------------------------------------------------

def test_mathvista_json_with_paths_and_parquet_with_embedded_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.jpg").write_bytes(_png())
    rows = {
        "1": {"pid": "1", "question": "Which angle is largest?", "image": "images/1.jpg", "choices": ["30°", "60°"],
              "answer": "60°", "question_type": "multi_choice", "answer_type": "text", "unit": None,
              "precision": None},
        "2": {"pid": "2", "question": "How many cubes?", "image": "images/1.jpg", "choices": None, "answer": "7",
              "question_type": "free_form", "answer_type": "integer", "unit": None, "precision": None},
    }
    (tmp_path / "testmini.json").write_text(json.dumps(rows))
    s = load_benchmark(tmp_path / "testmini.json")
    assert [x.task for x in s] == ["mathvista", "mathvista"]
    assert s[0].answer == "B" and s[0].choices == ["30°", "60°"]  # option text -> its letter
    assert s[0].question == "Which angle is largest?" and s[0].meta["pid"] == "1"
    assert s[1].answer == "7" and s[1].choices is None
    assert s[0].source == "testmini.json:row 1"

    table = pa.table({"pid": ["3"], "question": ["Value?"], "image": ["images/3.jpg"],
                      "decoded_image": [{"bytes": _png((0, 0, 200)), "path": None}], "choices": [None],
                      "answer": ["2.5"], "precision": [1.0], "unit": [None]})
    pq.write_table(table, tmp_path / "mv.parquet")
    (x,) = load_benchmark(tmp_path / "mv.parquet", name="mathvista")
    assert x.answer == "2.5" and x.meta["precision"] == 1.0 and _pixels(x.images[0])[0, 0].tolist() == [0, 0, 200]

    rows["1"]["answer"] = "90°"
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"bad\.json row 1 \(key '1'\): answer '90°'"):
        load_benchmark(tmp_path / "bad.json")


def test_geometry3k_parquet(tmp_path):
    pq.write_table(pa.table({
        "images": [[{"bytes": _png(), "path": None}], [{"bytes": _png(), "path": None}] * 2],
        "problem": ["<image>Find x.", "<image>Find the area."],
        "answer": ["3", "\\frac{1}{2}"],
    }), tmp_path / "geo.parquet")
    s = load_benchmark(tmp_path / "geo.parquet", name="auto")
    assert [x.task for x in s] == ["geometry3k"] * 2
    assert s[0].question == "Find x." and s[1].answer == "\\frac{1}{2}" and len(s[1].images) == 2


def test_wemath_mathverse_logicvista_mmk12(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "p.png").write_bytes(_png())
    _write_lines(tmp_path / "wemath.jsonl", [
        {"ID": "1-1", "question": "Which is longer?", "option": "A. 1 cm; B. 2 cm; C. No correct answer",
         "answer": "B", "image_path": "p.png", "knowledge concept": "length"}])
    (w,) = load_benchmark(tmp_path / "wemath.jsonl")
    assert (w.task, w.answer, w.choices) == ("wemath", "B", ["1 cm", "2 cm", "No correct answer"])
    assert w.question == "Which is longer?" and w.meta["knowledge concept"] == "length"

    _write_lines(tmp_path / "verse.jsonl", [
        {"sample_index": "1", "problem_version": "Text Lite", "question": "Find x.\nChoices:\nA:2\nB:4\nC:6",
         "answer": "C", "image": "p.png", "query_wo": "ignored"}])
    (v,) = load_benchmark(tmp_path / "verse.jsonl")
    assert (v.task, v.answer, v.choices, v.question) == ("mathverse", "C", ["2", "4", "6"], "Find x.")

    _write_lines(tmp_path / "lv.jsonl", [{"imagename": "p.png", "question": "Which? A. x B. y", "answer": "A, B",
                                          "skill": "inductive"}])
    (lv,) = load_benchmark(tmp_path / "lv.jsonl")
    assert (lv.task, lv.answer, lv.meta) == ("logicvista", "A, B", {"skill": "inductive"})

    _write_lines(tmp_path / "k12.jsonl", [{"id": 9, "subject": "physics", "question": "v?", "answer": 3,
                                           "image": "images/p.png"}])
    (k,) = load_benchmark(tmp_path / "k12.jsonl")
    assert (k.task, k.answer, k.meta) == ("mmk12", "3", {"id": 9, "subject": "physics"})

    with pytest.raises(ConfigError, match="mathvista"):
        load_benchmark(tmp_path / "k12.jsonl", name="mmmu")


def test_option_parsers():
    assert parse_option_string("A. 1; B. 2 cm; C. No correct answer") == ["1", "2 cm", "No correct answer"]
    assert parse_option_string("B. 1; C. 2") is None  # must start at A
    assert split_choice_block("Find x.\nChoices:\n(A) 2\n(B) 4") == ("Find x.", ["2", "4"])
    # text after the options: keep the question whole rather than lose part of it
    assert split_choice_block("Find x.\nChoices:\nA:2\nB:4\nExplain.") == ("Find x.\nChoices:\nA:2\nB:4\nExplain.",
                                                                          None)


def test_detect_benchmark_falls_back_to_generic():
    assert detect_benchmark({"image": "a.png", "question": "q", "answer": "1"}) == "generic"
    assert detect_benchmark({"images": [], "problem": "p", "answer": "1"}) == "geometry3k"


# --- property: never anything but Samples or DataError -------------------------------------------------

_IMAGE_REFS = st.sampled_from(["ok.png", "missing.png", "", "..", "/", "a\x00b", "data:image/png;base64,xx",
                               "http://x/y.png", "broken.png"])
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | _IMAGE_REFS
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
_KEYS = st.sampled_from(["image", "images", "question", "problem", "answer", "choices", "meta", "task", "other"])
_ROW = st.dictionaries(_KEYS, _JSON | _IMAGE_REFS, max_size=6)
_VALID = st.fixed_dictionaries({"image": st.just("ok.png"), "question": st.text(min_size=1, max_size=5),
                                "answer": st.integers() | st.floats() | st.text(max_size=5)},
                               optional={"choices": st.lists(st.text(max_size=3) | st.integers(), max_size=3),
                                         "meta": st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)})
_LINE = st.one_of(_ROW.map(lambda r: json.dumps(r).encode()),
                  _VALID.map(lambda r: json.dumps(r).encode()), _VALID.map(lambda r: json.dumps(r).encode()),
                  st.fixed_dictionaries({"image": _IMAGE_REFS, "question": st.text(max_size=5),
                                         "answer": _JSON}).map(lambda r: json.dumps(r).encode()),
                  st.binary(max_size=20), st.text(max_size=20).map(str.encode),
                  st.just(b"[" * 5000))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, max_size=5))
def test_random_jsonl_gives_samples_or_data_error(tmp_path, lines):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxx")
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        out = load_samples(path)
    except DataError as exc:
        assert "fuzz.jsonl" in str(exc)
    else:
        assert out and all(isinstance(s, Sample) and s.images and s.answer for s in out)
