"""compare.py: the packed published form gives back every record, and is byte-reproducible."""

import compare


def records(predictions, keyed=True):
    """Per-question records as evaluate.py writes them; the second question has no key."""
    out = []
    for i, prediction in enumerate(predictions):
        record = {"question": f"q{i}", "prediction": prediction, "exact_match": i == 0,
                  "token_f1": 1.0 if i == 0 else 0.5}
        if keyed and i == 0:
            record.update(key="k", key_match=True)
        record.update(group=f"g{i}", answer_nll=0.25 * (i + 1), answer_tokens=3)
        out.append(record)
    return out


def test_packing_keeps_fields_their_order_their_types_and_their_absence():
    runs = {"base": records(["a", "b"]), "full": records(["a", "c"]),
            "lora": [{**r, "token_f1": 1} if i == 0 else r
                     for i, r in enumerate(records(["x", "b"]))]}  # 1 (int) is not 1.0
    table = compare.pack_records(runs)
    assert table["questions"][1]["question"] == "q1" and "prediction" not in table["questions"][0]
    back = compare.unpack_records(table)
    assert back == runs
    for name in runs:
        for mine, theirs in zip(back[name], runs[name]):
            assert list(mine) == list(theirs)
            assert [type(v) for v in mine.values()] == [type(v) for v in theirs.values()]


def test_the_published_file_is_the_same_bytes_each_time(tmp_path):
    runs = {"base": records(["a", "b"]), "full": records(["a", "c"])}
    compare.write_published(tmp_path / "one.gz", runs)
    compare.write_published(tmp_path / "two.gz", runs)
    assert (tmp_path / "one.gz").read_bytes() == (tmp_path / "two.gz").read_bytes()
    (tmp_path / compare.PUBLISHED).write_bytes((tmp_path / "one.gz").read_bytes())
    assert compare.read_published(tmp_path) == runs
    assert compare.read_published(tmp_path / "missing") is None


def test_a_published_file_is_parsed_once_for_records_and_probes_and_again_when_rewritten(
        tmp_path):
    runs = {"base": records(["a", "b"]), "full": records(["a", "c"])}
    probes = {"base": {"probe": "p", "nll": [1.0]}, "full": {"probe": "p", "nll": [1.5]}}
    path = tmp_path / compare.PUBLISHED
    compare.write_published(path, runs, probes)
    before = compare._parse_published.cache_info().misses
    assert compare.read_published(tmp_path) == runs
    assert compare.read_published_probes(tmp_path) == probes
    assert compare._parse_published.cache_info().misses == before + 1
    other = {"base": records(["z", "b"]), "full": records(["a", "y"])}
    compare.write_published(path, other)
    assert compare.read_published(tmp_path) == other
    assert compare.read_published_probes(tmp_path) is None


def test_script_for_names_each_method_script():
    assert compare.script_for("full") == "python finetune.py"
    assert compare.script_for("qlora") == "python finetune_qlora.py"
