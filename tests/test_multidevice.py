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


def test_eight_devices_equal_one(model_dir):
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
    r = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, model_dir], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
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
            procs.append(subprocess.Popen([*cmd, two, *opts, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                           "2", "--process-id", str(i)], cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, text=True))
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
