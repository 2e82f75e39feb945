"""Data parallelism: 8 simulated CPU devices equal 1; two jax.distributed processes equal one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.embed_helpers import random_texts, tiny_model_dir
from tests.test_embed import files

EIGHT_DEVICES = r"""
import json, sys
import jax
import numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
from retribert_jax import RetriBertModel, RetriBertTokenizer
from retribert_jax.encode import Encoder
from tests.embed_helpers import random_texts

d = sys.argv[1]
model, tok = RetriBertModel.from_pretrained(d), RetriBertTokenizer.from_pretrained(d)
texts = random_texts(45, seed=9)
many = Encoder(model, tok)
one = Encoder(model, tok, mesh=jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                                              devices=jax.devices()[:1]))
res = {"devices": many.num_devices}
for kind in ("questions", "passages"):
    a = many.encode(texts, kind, batch_size=12)
    b = one.encode(texts, kind, batch_size=12)
    res[kind] = float(np.abs(a - b).max())
res["rows"] = sorted({rows for _, rows, _ in many.shapes_seen})
print(json.dumps(res))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("model")))


@pytest.mark.slow
def test_eight_devices_equal_one(model_dir):
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
    }
    r = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, model_dir], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["devices"] == 8, f"expected 8 simulated devices, the Encoder's mesh has {res['devices']}"
    assert res["rows"] == [16], f"batch 12 should round up to 16 rows over 8 devices, got {res['rows']}"
    for kind in ("questions", "passages"):
        assert res[kind] <= 1e-5, f"{kind}: 8 devices vs 1 differ by {res[kind]:.3g}"


@pytest.mark.slow
def test_two_processes_equal_one(model_dir, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(t + "\n" for t in random_texts(230, seed=10)), encoding="utf-8")
    opts = ["--kind", "passages", "--shard-size", "50", "--store-text", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "retribert_jax.cli", "embed", model_dir, str(path)]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    port = free_port()
    # Logs go to files, not pipes: a process blocked on a full pipe that nobody reads (we wait for the other one
    # first) would stall the pair, since process 0 waits for process 1's shards.
    logs = [tmp_path / f"log{i}.txt" for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:
            procs.append(
                subprocess.Popen(
                    [
                        *cmd,
                        two,
                        *opts,
                        "--coordinator",
                        f"127.0.0.1:{port}",
                        "--num-processes",
                        "2",
                        "--process-id",
                        str(i),
                    ],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        err = logs[i].read_text()
        assert p.returncode == 0, f"process {i}: {err[-3000:]}"
        assert f"process {i}/2: embedded" in err, err[-3000:]
    r = subprocess.run([*cmd, one, *opts], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = files(two), files(one)
    assert a.keys() == b.keys(), f"files differ: {sorted(a.keys() ^ b.keys())}"
    differing = [n for n in a if a[n] != b[n]]
    assert not differing, f"two-process output differs from the single-process one in {differing}"


SEARCH = r"""
import json, sys
import jax
if int(sys.argv[2]) > 1:
    jax.distributed.initialize(sys.argv[3], num_processes=int(sys.argv[2]), process_id=int(sys.argv[1]))
import numpy as np
from retribert_jax.search import Index

d, out = sys.argv[4], sys.argv[5]
q = np.random.default_rng(5).standard_normal((24, 32)).astype(np.float32)
res = {"devices": len(jax.devices()), "processes": jax.process_count()}
runs = (
    ("resident", {}),
    ("streamed", {"max_device_rows": 11_000}),
    ("int8", {"scan": "int8"}),
    ("bfloat16", {"screen_dtype": "bfloat16"}),  # each device's bound from its own rows' residuals
)
for name, kw in runs:
    index = Index(d, **kw)
    scores, rows = index.search_rows(q, 50)
    res[name] = {"rows": rows.tolist(), "scores": scores.tolist(), "passes": -(-len(index) // index._rows_per_pass())}
if jax.process_index() == 0:
    with open(out, "w") as f:
        json.dump(res, f)
"""


@pytest.fixture(scope="module")
def search_index(tmp_path_factory) -> str:
    """140,000 rows: 17,500 per device on 8 devices, enough for each to screen (search.SCREEN_MIN_ROWS); with an
    int8 copy."""
    import numpy as np

    from retribert_jax.embedding_dir import write_compressed
    from tests.test_search import write_index

    rng = np.random.default_rng(3)
    d = write_index(tmp_path_factory.mktemp("search") / "idx", rng.standard_normal((140_000, 32)).astype("f4"), 50_000)
    write_compressed(d, ["int8"])
    return d


def run_search(search_index, out, devices: int, processes: int = 1) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": REPO,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}",
    }
    address = f"127.0.0.1:{free_port()}"
    logs = [open(f"{out}.log{i}", "w+") for i in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SEARCH, str(i), str(processes), address, search_index, out],
            cwd=REPO,
            env=env,
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(processes)
    ]
    try:
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        log.seek(0)
        assert p.returncode == 0, f"process {i}: {log.read()[-3000:]}"
        log.close()
    with open(out) as f:
        return json.load(f)


def assert_same_hits(many: dict, one: dict, what: str) -> None:
    import numpy as np

    # int8: each device shortlists its own best rows by the approximate score, the best of those are rescored.
    for name in ("resident", "streamed", "int8", "bfloat16"):
        assert many[name]["rows"] == one[name]["rows"], f"{what}, {name}: hits differ from one device's"
        # The same inner products; programs of other shapes may sum them in another order.
        np.testing.assert_allclose(many[name]["scores"], one[name]["scores"], rtol=1e-6, atol=0)
    assert many["streamed"]["passes"] > 1 and many["resident"]["passes"] == 1
    assert many["bfloat16"]["rows"] == many["resident"]["rows"], f"{what}: a bfloat16 screen changed the hits"


@pytest.mark.slow
def test_search_on_eight_devices_equals_one(search_index, tmp_path):
    eight = run_search(search_index, str(tmp_path / "eight.json"), devices=8)
    one = run_search(search_index, str(tmp_path / "one.json"), devices=1)
    assert eight["devices"] == 8 and one["devices"] == 1
    assert_same_hits(eight, one, "8 devices")


@pytest.mark.slow
def test_search_by_two_processes_equals_one(search_index, tmp_path):
    two = run_search(search_index, str(tmp_path / "two.json"), devices=2, processes=2)
    one = run_search(search_index, str(tmp_path / "one.json"), devices=1)
    assert two["devices"] == 4 and two["processes"] == 2
    assert_same_hits(two, one, "2 processes x 2 devices")
