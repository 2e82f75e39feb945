"""The accelerator path, as far as a CPU can check it: the jitted embedding program and the train step lowered for
CUDA and TPU (`jax.export`, cross-platform), and what matters read off the StableHLO: bf16 operands, f32 scores,
one layer body whatever the depth, no host callback, the intended shardings over 8 devices, and the cuDNN call.

What stays unchecked without a GPU/TPU: the device compilers themselves (XLA:GPU, cuDNN's acceptance of the fused
attention call at compile time, XLA:TPU), and the numbers the devices compute; `benchmarks/run.py --device-check`
measures those when a device is lent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import export

from retribert_jax import RetriBertConfig, RunConfig
from retribert_jax.modeling import abstract_model, embed_batch
from tests.conftest import REPO

PLATFORMS = ("cuda", "tpu")


def lowered_text(
    cfg: RetriBertConfig,
    dtype,
    kind: str = "passages",
    rows: int = 16,
    length: int = 48,
    platforms=PLATFORMS,
    attention_impl: str = "xla",
    packed: bool = False,
    trim: bool = True,
) -> str:
    """The embedding program's StableHLO; `packed`: the Encoder's, with position_ids and cls_index (6 texts a row);
    `trim`: the last layer on the [CLS] rows alone (False: on every row, what the Encoder compiles for short jobs)."""
    run = RunConfig(dtype=dtype, attention_impl=attention_impl, trim_last_layer=trim)
    graphdef, state = nnx.split(abstract_model(cfg, run_config=run))
    spec = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    args = (state, spec, spec) + ((spec, jax.ShapeDtypeStruct((rows, 6), jnp.int32)) if packed else ())
    fn = jax.jit(lambda *a: embed_batch(graphdef, *a[:3], kind, *a[3:]))
    if attention_impl == "cudnn":  # cuDNN's custom call has no serialization guarantee, so jax.export refuses it
        return fn.trace(*args).lower(lowering_platforms=tuple(platforms)).as_text()
    exported = export.export(fn, platforms=platforms)(*args)
    assert exported.platforms == tuple(platforms)
    return exported.mlir_module()


def dots(text: str) -> list[tuple[list[str], str]]:
    """(operand element types, result element type) of every distinct dot_general."""
    out = set()
    for m in re.finditer(r"stablehlo\.dot_general[^\n]*?: \(([^)]*)\) -> tensor<([^>]*)>", text):
        operands = tuple(t.split("x")[-1] for t in re.findall(r"tensor<([^>]*)>", m.group(1)))
        out.add((m.group(0), operands, m.group(2).split("x")[-1]))
    return [(list(ops), res) for _, ops, res in sorted(out)]


@pytest.mark.parametrize("kind", ["questions", "passages"])
def test_bf16_program_multiplies_in_bf16_and_scores_in_f32(kind):
    found = dots(lowered_text(RetriBertConfig.tiny(share_encoders=False), jnp.bfloat16, kind))
    assert found, "no dot_general in the lowered program"
    not_bf16 = [d for d in found if d[0] != ["bf16", "bf16"]]
    assert not not_bf16, f"dot_generals with non-bf16 operands in bf16 mode: {not_bf16}"
    scores = [d for d in found if d[1] == "f32"]
    # Attention's two products (QK^T, and the weights times V before the softmax's division) accumulate in f32
    # (preferred_element_type), in the scanned layers and in the [CLS]-only last one.
    assert len(scores) == 4, f"expected the QK^T and PV products to give f32, got {scores}"


def test_untrimmed_program_is_one_loop_with_bf16_matmuls_and_f32_scores():
    """The program a short job compiles (every layer in the scan, no layer index without dropout) lowers for CUDA and
    TPU with the same precision split, and stays one scanned body whatever the depth."""
    small, deep = (
        lowered_text(RetriBertConfig.tiny(num_hidden_layers=n), jnp.bfloat16, packed=True, trim=False) for n in (2, 6)
    )
    found = dots(small)
    assert [d for d in found if d[0] != ["bf16", "bf16"]] == [], found
    assert len([d for d in found if d[1] == "f32"]) == 2, f"expected only the scanned QK^T and PV in f32: {found}"
    ops = [len(re.findall(r"= stablehlo\.", t)) for t in (small, deep)]
    assert abs(ops[1] - ops[0]) <= 2 and "stablehlo.while" in small, f"{ops[0]} ops for 2 layers, {ops[1]} for 6"


@pytest.mark.parametrize("packed", [False, True])
def test_f32_program_stays_f32(packed):
    found = dots(lowered_text(RetriBertConfig.tiny(), jnp.float32, packed=packed))
    assert found and all(d == (["f32", "f32"], "f32") for d in found), found


def test_program_size_does_not_grow_with_depth():
    """The layers are one scanned body: 2 and 6 layers lower to the same number of matmuls and the same ops."""
    small, deep = (lowered_text(RetriBertConfig.tiny(num_hidden_layers=n), jnp.bfloat16) for n in (2, 6))
    assert len(dots(small)) == len(dots(deep)), "more layers, more matmuls: the stack is unrolled"
    ops = [len(re.findall(r"= stablehlo\.", t)) for t in (small, deep)]
    # (Unrolled, 4 more layers would add hundreds of ops; the scan adds at most a constant or two.)
    assert abs(ops[1] - ops[0]) <= 2, f"{ops[0]} ops for 2 layers, {ops[1]} for 6"
    assert "stablehlo.while" in small, "no loop over the layers"


def custom_calls(text: str) -> set[str]:
    return {a or b for a, b in re.findall(r'custom_call @([\w$.]+)|call_target_name = "([^"]+)"', text)}


def test_no_host_callback_on_any_platform():
    text = lowered_text(RetriBertConfig.tiny(), jnp.bfloat16)
    calls = custom_calls(text)
    host = {c for c in calls if re.search(r"callback|host", c, re.I)}
    assert not host, f"host round trips in the program: {host}"
    assert not re.search(r"stablehlo\.(send|recv|outfeed|infeed)\b", text), "device-host transfer in the program"


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_attention_lowers_to_the_fused_call(monkeypatch, packed):
    """JAX refuses to lower the cuDNN branch unless it finds cuDNN; standing in for a cuDNN 9.10 install checks our
    call against JAX's own rules (layout, mask, dtypes, head dim) and that it becomes cuDNN's fused attention."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    text = lowered_text(
        RetriBertConfig.tiny(num_attention_heads=2),
        jnp.bfloat16,
        attention_impl="cudnn",
        platforms=("cuda",),
        packed=packed,
    )
    fused = {c for c in custom_calls(text) if c.startswith("__cudnn$fmha")}
    assert fused, f"the cudnn branch did not lower to cuDNN's fused attention: {custom_calls(text)}"


MULTI = r"""
import functools, os, re
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp
from flax import nnx
from jax import export
from retribert_jax import RetriBertConfig, TrainConfig
from retribert_jax.mesh import batch_sharding, data_mesh, replicated
from retribert_jax.modeling import abstract_model, embed, embed_batch, init_model
from retribert_jax.training import make_optimizer, make_train_step

DATA, REP = '[{"data"}, {}]', "[{}"


def signature(text):
    # (argument shardings, result shardings) of the exported main function, as Shardy writes them
    head = text[text.index("func.func public @main"):]
    head = head[:head.index("{\n")]
    args, results = head.split(") -> (") if ") -> (" in head else (head, "")
    pick = lambda part: re.findall(r"sdy\.sharding = #sdy\.sharding<@mesh, (\[[^>]*\])>", part)
    return pick(args), pick(results)


mesh = data_mesh()
rep, data = replicated(mesh), batch_sharding(mesh)
cfg = RetriBertConfig.tiny()
graphdef, state = nnx.split(abstract_model(cfg, dtype=jnp.bfloat16))
state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), state)
ids = jax.ShapeDtypeStruct((32, 48), jnp.int32, sharding=data)
cls = jax.ShapeDtypeStruct((32, 6), jnp.int32, sharding=data)
# The Encoder's program: modeling.embed on packed rows, replicated parameters, the batch split over "data".
fn = jax.jit(lambda *a: embed_batch(graphdef, *a[:3], "passages", *a[3:]), in_shardings=(rep,) + (data,) * 4)
exp = export.export(fn, platforms=("cuda", "tpu"))(state, ids, ids, ids, cls)
assert exp.nr_devices == 8, exp.nr_devices
args, _ = signature(exp.mlir_module())
# (jit drops the one parameter a kind does not use: project_query for passages.)
assert args[-4:] == [DATA] * 4 and len(args) >= len(jax.tree.leaves(state)) + 3, args[-5:]
assert all(a.startswith(REP) and '"data"' not in a for a in args[:-4]), "a parameter is not replicated"
# The same program compiled here: the output stays split over "data" (the compiler's propagation).
compiled = embed.lower(graphdef, state, ids, ids, kind="passages", position_ids=ids, cls_index=cls).compile()
assert compiled.output_shardings.spec == jax.sharding.PartitionSpec("data"), compiled.output_shardings

tcfg = TrainConfig(batch_size=32, max_length=48, checkpoint_batch_size=-1, micro_batch_size=16)
model = init_model(cfg)
model.train()
g, params = nnx.split(model, nnx.Param)
tx = make_optimizer(tcfg, 10)
step = make_train_step(g, tx, tcfg, None, data, rep)
abstract = lambda t, sh: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), t)
p_spec, o_spec = abstract(params, rep), abstract(jax.eval_shape(tx.init, params), rep)
batch = {k: jax.ShapeDtypeStruct((32, 40), jnp.int32, sharding=data) for k in ("q_ids", "q_mask", "p_ids", "p_mask")}
key = jax.eval_shape(lambda: jax.random.key(0))
exp = export.export(step, platforms=("cuda", "tpu"))(p_spec, o_spec, batch, key, jax.ShapeDtypeStruct((), jnp.int32))
text = exp.mlir_module()
assert not any("callback" in c for c in re.findall(r'custom_call @([\w$.]+)', text)), "host callback"
args, results = signature(text)
n_state = len(jax.tree.leaves(params)) + len(jax.tree.leaves(o_spec))
assert args.count(DATA) == 4 and all('"data"' not in a for a in args[:n_state]), args
assert len(results) >= n_state and all('"data"' not in r for r in results[:n_state]), results[:3]
print("OK")
"""


@pytest.mark.slow
def test_shardings_over_eight_devices_for_cuda_and_tpu():
    proc = subprocess.run(
        [sys.executable, "-c", MULTI],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_unrolled_stack_computes_the_same_and_lets_xla_count_every_layer():
    """`scan_unroll=True` (what benchmarks/roofline.py compiles) gives the scanned program's numbers, and XLA's
    cost_analysis of it grows by one layer's matmul FLOPs per added layer (a scan's body is counted once)."""
    import numpy as np

    from benchmarks.roofline import cost
    from retribert_jax.modeling import embed, init_model

    cfg = RetriBertConfig.tiny()
    model = init_model(cfg)
    graphdef, state = nnx.split(model)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, size=(4, 12)).astype(np.int32)
    scanned = np.asarray(embed(graphdef, state, ids, np.ones_like(ids), kind="questions"))
    graphdef, state = nnx.split(model.with_run_config(RunConfig(scan_unroll=cfg.num_hidden_layers)))
    unrolled = np.asarray(embed(graphdef, state, ids, np.ones_like(ids), kind="questions"))
    assert np.abs(scanned - unrolled).max() <= 1e-6, "the unrolled stack computes other numbers"
    two, four = (cost(RetriBertConfig.tiny(num_hidden_layers=n), jnp.float32, 8, 32)["flops"] for n in (2, 4))
    d, f, length = cfg.hidden_size, cfg.intermediate_size, 32
    per_layer = 8 * length * (8 * d * d + 4 * d * f + 4 * length * d)  # 8 rows, matmul FLOPs of one full layer
    assert 0.95 <= (four - two) / (2 * per_layer) <= 1.3, (
        f"two more layers added {four - two:.3g} FLOPs, expected about {2 * per_layer:.3g}"
    )


def test_programs_name_the_blocks_as_the_modules_do():
    """`jax.named_scope` around the embeddings, attention, FFN and pooler: a device trace or an HLO dump names the
    blocks as the modules are named."""
    from flax import nnx

    from retribert_jax.modeling import abstract_model, embed

    graphdef, state = nnx.split(abstract_model(RetriBertConfig.tiny()))
    spec = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    text = embed.lower(graphdef, state, spec, spec, kind="passages").as_text(debug_info=True)
    missing = [name for name in ("embeddings", "attention", "ffn", "pooler") if f"{name}/" not in text]
    assert not missing, f"no named scope for {missing} in the lowered program"
