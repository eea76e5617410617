"""common.py: what every script shares (files, JSON, errors)."""

from helpers import strict_json

import common


def test_json_outputs_write_null_for_nan_and_infinity(tmp_path):
    values = {"loss": float("nan"), "history": [1.5, float("inf"), (float("-inf"),)], "n": 3}
    common.write_json(tmp_path / "a.json", values)
    common.write_jsonl(tmp_path / "b.jsonl", [values, {"x": float("nan")}])
    assert strict_json((tmp_path / "a.json").read_text()) == {
        "loss": None, "history": [1.5, None, [None]], "n": 3}
    rows = [strict_json(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert rows[1] == {"x": None}
