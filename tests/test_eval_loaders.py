"""Loaders on tiny fixtures in each benchmark's real layout (tests/fixtures/eval/<name>/)."""

import base64
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fitprune.evaluation import loaders as L
from fitprune.evaluation.loaders import EvalDataError, EvalSample, load

FIX = Path(__file__).parent / "fixtures" / "eval"


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    return buf.getvalue()


def test_pope():
    s = load("pope", FIX / "pope")
    assert [x.id for x in s] == ["adversarial/1", "adversarial/2", "popular/1", "random/1"]
    assert s[0].answers == ["yes"] and s[1].answers == ["no"]
    assert s[0].question == "Is there a dog in the image?"
    assert s[2].metadata == {"category": "popular"}
    assert all(Path(x.image).is_file() for x in s)
    assert [x.id for x in load("pope", FIX / "pope", categories=["random"])] == ["random/1"]


def test_gqa():
    s = load("gqa", FIX / "gqa")
    assert [(x.id, x.answers) for x in s] == [("20968379", ["yes"]), ("20968380", ["dog"])]
    assert Path(s[0].image).is_file() and s[0].image.endswith("n288870.jpg")
    assert s[1].metadata["fullAnswer"] == "It is a dog."


def test_textvqa():
    s = load("textvqa", FIX / "textvqa")
    assert [x.id for x in s] == ["34602", "34603"]
    assert len(s[0].answers) == 10 and s[0].answers[-1] == "toshiba"
    assert s[0].metadata["ocr_tokens"] == ["NOKIA"]
    assert Path(s[0].image).is_file()


def test_vqav2():
    s = load("vqav2", FIX / "vqav2")
    assert [x.id for x in s] == ["42000", "42001"]
    assert s[0].answers == ["2"] * 8 + ["3"] * 2
    assert s[0].metadata == {"image_id": 42, "answer_type": "number", "question_type": "how many"}
    assert Path(s[0].image).is_file() and s[0].image.endswith("COCO_val2014_000000000042.jpg")


def test_vqav2_without_annotations_has_empty_answers(tmp_path):
    (tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json").write_text(json.dumps(
        {"questions": [{"image_id": 1, "question": "Why?", "question_id": 10}]}))
    s = load("vqav2", tmp_path, split="test-dev2015")
    assert s[0].answers == [] and s[0].image.endswith("test-dev2015/COCO_test-dev2015_000000000001.jpg")


def test_mme_both_release_layouts():
    s = load("mme", FIX / "mme" / "MME_Benchmark_release_version")
    assert [x.id for x in s] == ["artwork/10002/1", "artwork/10002/2", "existence/000000006040/1",
                                 "existence/000000006040/2"]
    assert [x.answers for x in s] == [["Yes"], ["No"], ["Yes"], ["No"]]
    assert all(Path(x.image).is_file() for x in s)            # .jpg in images/, .png side by side
    assert s[2].metadata == {"subtask": "existence", "image_name": "000000006040.png"}


def test_mme_three_column_lines(tmp_path):
    (tmp_path / "count").mkdir()
    (tmp_path / "count" / "count.txt").write_text("0001.png\tAre there two dogs?\tYes\n\n0002.png\tOne cat?\tNo\n")
    s = load("mme", tmp_path)
    assert [(x.metadata["image_name"], x.question, x.answers) for x in s] == [
        ("0001.png", "Are there two dogs?", ["Yes"]), ("0002.png", "One cat?", ["No"])]


def test_mmbench_keeps_base64_without_cache():
    s = load("mmbench", FIX / "mmbench" / "mmbench_dev_en.tsv")
    assert [x.id for x in s] == ["0", "1", "2"]
    assert s[0].choices == ["red", "green", "blue", "black"]
    assert s[1].choices == ["dog", "shark"]                   # empty C, D dropped
    assert s[2].choices == ["ant", "elephant", "mouse"] and s[2].answers == ["B"]
    assert s[1].metadata["hint"] == "Think about animals." and "hint" not in s[2].metadata  # "nan"
    assert s[0].image is None
    assert base64.b64decode(s[0].metadata["image_b64"])[:4] == b"\x89PNG"


def test_mmbench_writes_cache_once(tmp_path):
    s = load("mmbench", FIX / "mmbench", file="mmbench_dev_en.tsv", cache_dir=tmp_path / "c")
    assert s[0].image == str(tmp_path / "c" / "mmbench_0.png") and Path(s[0].image).is_file()
    assert "image_b64" not in s[0].metadata
    mtime = Path(s[0].image).stat().st_mtime_ns
    load("mmbench", FIX / "mmbench" / "mmbench_dev_en.tsv", cache_dir=tmp_path / "c")
    assert Path(s[0].image).stat().st_mtime_ns == mtime       # idempotent
    assert not list((tmp_path / "c").glob("*.part"))


def test_scienceqa():
    s = load("scienceqa", FIX / "scienceqa")
    assert [x.id for x in s] == ["1", "5"]
    assert s[0].image is None and s[0].answers == ["B"] and s[0].choices == ["simile", "metaphor"]
    assert s[1].answers == ["C"] and s[1].metadata["answer_index"] == 2
    assert Path(s[1].image).is_file() and s[1].image.endswith("images/test/5/image.png")
    assert [x.id for x in load("scienceqa", FIX / "scienceqa", with_image_only=True)] == ["5"]
    assert [x.id for x in load("scienceqa", FIX / "scienceqa", split="train")] == ["9"]


def test_parquet_struct_images(tmp_path):
    shard = FIX / "parquet" / "validation-00000-of-00001.parquet"
    s = load("parquet", shard, id_col="question_id")
    assert [x.id for x in s] == ["q0", "q1", "q2"]
    assert s[0].answers == ["cat", "cat", "kitten"] and s[1].answers == ["yes"]
    assert s[0].image is None and s[0].metadata["image_bytes"][:4] == b"\x89PNG"
    assert s[1].image == str(shard.parent / "images" / "b.png")     # path-only struct
    assert s[0].metadata["category"] == "animal"
    cached = load("parquet", FIX / "parquet", id_col="question_id", cache_dir=tmp_path)  # folder of shards
    assert cached[0].image.endswith("_q0.png") and cached[2].image.endswith("_q2.jpg")
    assert all(Path(cached[i].image).is_file() for i in (0, 2))


def test_parquet_binary_column_and_custom_names(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"q": ["Is it?"], "a": ["no"], "img": pa.array([_png()], type=pa.binary())}), path)
    s = load("parquet", path, question_col="q", answer_col="a", image_col="img")
    assert s[0].id == "0" and s[0].answers == ["no"] and s[0].metadata["image_bytes"][:4] == b"\x89PNG"


# --- registry -------------------------------------------------------------------------------------

def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown benchmark 'vizwiz'; known: gqa, mmbench, mme, parquet, pope"):
        load("vizwiz", FIX)


def test_register_checked(monkeypatch):
    monkeypatch.setattr(L, "LOADERS", dict(L.LOADERS))
    L.register("toy", lambda root: [EvalSample("1", None, "q", ["a"])])
    assert load("toy", "x")[0].answers == ["a"]
    with pytest.raises(ValueError, match="already registered"):
        L.register("toy", lambda root: [])


def test_eval_sample_validates():
    with pytest.raises(ValueError, match="answers must be a list of str"):
        EvalSample("1", None, "q", "a")


# --- malformed input: one per loader family, errors name the file and line / entry ------------------

def test_jsonl_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "coco_pope_random.json").write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "q?", "label": "yes"}\n{"question_id": 2, oops}\n')
    with pytest.raises(EvalDataError, match=r"coco_pope_random\.json:2: invalid JSON line"):
        load("pope", tmp_path, categories=["random"])


def test_pope_bad_label(tmp_path):
    (tmp_path / "coco_pope_random.json").write_text(
        '{"question_id": 1, "image": "a.jpg", "text": "q?", "label": "maybe"}\n')
    with pytest.raises(EvalDataError, match=r"coco_pope_random\.json:1: label must be 'yes' or 'no'"):
        load("pope", tmp_path, categories=["random"])


def test_missing_file_says_where(tmp_path):
    with pytest.raises(EvalDataError, match="coco_pope_adversarial.json does not exist"):
        load("pope", tmp_path)


def test_json_syntax_error_names_line(tmp_path):
    (tmp_path / "testdev_balanced_questions.json").write_text('{\n "1": {"imageId": "n1",\n}')
    with pytest.raises(EvalDataError, match=r"testdev_balanced_questions\.json:3: invalid JSON"):
        load("gqa", tmp_path)


def test_json_missing_field_names_entry(tmp_path):
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps({"7": {"imageId": "n1", "question": "q"}}))
    with pytest.raises(EvalDataError, match=r"entry '7': missing field 'answer'"):
        load("gqa", tmp_path)
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [{"question_id": 1, "image_id": "x",
                                                                            "question": "q"}]}))
    with pytest.raises(EvalDataError, match=r"data\[0\]: missing field 'answers'"):
        load("textvqa", tmp_path)


def test_vqav2_missing_annotation(tmp_path):
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"questions": [{"image_id": 1, "question": "q", "question_id": 5}]}))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 6, "answers": [{"answer": "x"}]}]}))
    with pytest.raises(EvalDataError, match="no annotation for question_id 5"):
        load("vqav2", tmp_path)


def test_mme_bad_line(tmp_path):
    (tmp_path / "color").mkdir()
    (tmp_path / "color" / "1.txt").write_text("Is it red?\tYes\nno tab here\n")
    with pytest.raises(EvalDataError, match=r"1\.txt:2: expected 'question<TAB>Yes\|No'"):
        load("mme", tmp_path)
    (tmp_path / "color" / "1.txt").write_text("Is it red?\tMaybe\n")
    with pytest.raises(EvalDataError, match=r"1\.txt:1: answer must be 'Yes' or 'No'"):
        load("mme", tmp_path)


def test_mmbench_bad_rows(tmp_path):
    tsv = tmp_path / "m.tsv"
    tsv.write_text("index\tquestion\tA\tB\tanswer\n0\tq\tx\ty\tA\n1\tq\tx\n")
    with pytest.raises(EvalDataError, match=r"m\.tsv:3: row has"):
        load("mmbench", tsv)
    tsv.write_text("index\tquestion\tA\tB\tanswer\n0\tq\tx\ty\tC\n")
    with pytest.raises(EvalDataError, match=r"m\.tsv:2: answer 'C' is not one of the options"):
        load("mmbench", tsv)
    tsv.write_text("index\tquestion\tA\tB\tanswer\timage\n0\tq\tx\ty\tA\tnot base64!\n")
    with pytest.raises(EvalDataError, match=r"m\.tsv:2: column 'image' is not valid base64"):
        load("mmbench", tsv, cache_dir=tmp_path / "c")
    tsv.write_text("idx\tquestion\n")
    with pytest.raises(EvalDataError, match=r"m\.tsv:1: header lacks columns"):
        load("mmbench", tsv)


def test_scienceqa_bad_split_and_answer(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps({"1": {"question": "q", "choices": ["a"], "answer": 3}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"test": ["1"]}))
    with pytest.raises(EvalDataError, match=r"no split 'minival'; known splits: \['test'\]"):
        load("scienceqa", tmp_path, split="minival")
    with pytest.raises(EvalDataError, match=r"problem '1': answer index 3 out of range"):
        load("scienceqa", tmp_path)


def test_parquet_bad_inputs(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": [3]}), path)
    with pytest.raises(EvalDataError, match=r"missing columns \['image'\]"):
        load("parquet", path)
    with pytest.raises(EvalDataError, match=r"d\.parquet: row 0: column 'answer' must be a string"):
        load("parquet", path, image_col=None)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(EvalDataError, match="not a readable Parquet file"):
        load("parquet", tmp_path / "junk.parquet")


def test_modules_do_not_import_torch():
    # Loaded by file path so fitprune/__init__ (which does import torch) stays out of the picture.
    import subprocess
    import sys
    code = (
        "import importlib.util, sys\n"
        "for name in ('metrics', 'loaders'):\n"
        f"    spec = importlib.util.spec_from_file_location(name, r'{FIX.parents[2] / 'fitprune' / 'evaluation'}/' + name + '.py')\n"
        "    mod = sys.modules[name] = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(mod)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
