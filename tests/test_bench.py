import json

import bench


def test_bench_writes_the_documented_json(tiny_data, tmp_path):
    out = tmp_path / "b.json"
    rows = bench.main_bench(["--data-dir", tiny_data, "--quick", "--rounds", "1", "--json", str(out),
                             "--cache-dir", str(tmp_path / "cache"), "--workers", "1", "--models", "three"])
    data = json.load(open(out))
    assert isinstance(data["device"], str) and data["rows"] == rows
    assert [(r["stage"], r["model"]) for r in rows] == [("input", "-"), ("train", "three"), ("infer", "three")]
    for r in rows:
        assert r["baseline_img_s"] > 0 and r["fast_img_s"] > 0
        assert abs(r["ratio"] - r["fast_img_s"] / r["baseline_img_s"]) < 1e-9
    assert rows[1]["gflop_per_image"] > 3 * rows[2]["gflop_per_image"] * 0.9  # training = forward + backward
