"""Sharded training on 8 simulated CPU devices (``tests/conftest.py`` sets them up).

A tiny LLaMA trained with GaLore, Fira and AdamW on meshes ``(data, fsdp, tensor)``
= (8,1,1), (2,4,1), (2,2,2) must give the losses of the one-device run across a
projector refresh; the state keeps its types and shardings through an update;
projector refreshes of a sharded gradient match the unsharded ones (and NumPy);
a checkpoint written on 8 devices restores onto 2 and 1 devices and continues
bit-identically to the same state placed there directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lowrank_jax as lj
from lowrank_jax import sharding as sh
from lowrank_jax.inner import scale_by_reference_adam
from lowrank_jax.models import Llama, loss_from_state
from lowrank_jax.models.presets import get_preset
from lowrank_jax.transform import scale_by_lowrank
from train.checkpoint import CheckpointStore
from train.config import CheckpointConfig

CFG = get_preset("llama_tiny", hidden_size=32, intermediate_size=64, num_heads=2,
                 num_layers=1, vocab_size=64, max_seq_len=8)
BATCH, SEQ, STEPS, GAP = 8, 8, 4, 2
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def _mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    n = int(np.prod(shape))
    return sh.make_mesh(dict(zip(sh.MESH_AXES, shape)), jax.devices()[:n])


def _tx(name: str) -> optax.GradientTransformation:
    kwargs = {} if name == "adamw" else {"rank": 4, "update_proj_gap": GAP}
    return optax.chain(optax.clip_by_global_norm(1.0), lj.OPTIMIZERS[name](1e-2, **kwargs))


def _batches(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"tokens": rng.integers(0, CFG.vocab_size, (BATCH, SEQ + 1)).astype(np.int32),
             "mask": np.ones((BATCH, SEQ), np.float32)} for _ in range(n)]


class Harness:
    """Jitted init/step of ``(params, opt_state)`` with the library's shardings on a mesh."""

    def __init__(self, name: str, mesh: jax.sharding.Mesh):
        self.name, self.mesh, self.tx = name, mesh, _tx(name)
        self.graphdef, abstract = nnx.split(
            nnx.eval_shape(lambda: Llama(CFG, rngs=nnx.Rngs(0))), nnx.Param)
        pspecs = sh.param_specs(abstract, mesh)
        ospecs = sh.optimizer_state_specs(self.tx, abstract, pspecs, mesh)
        self.specs = (pspecs, ospecs)
        self.sharding = sh.named_shardings(self.specs, mesh)
        shapes = jax.eval_shape(lambda: (abstract, self.tx.init(abstract)))
        self.abstract = jax.tree.map(
            lambda s, shd: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd),
            shapes, self.sharding)
        bs = NamedSharding(mesh, sh.batch_spec(mesh))
        self.batch_sharding = {"tokens": bs, "mask": bs}
        tx, graphdef = self.tx, self.graphdef

        def step(state, batch):
            params, opt_state = state
            (loss, _), grads = jax.value_and_grad(loss_from_state, argnums=1, has_aux=True)(
                graphdef, params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        self.step = jax.jit(step, in_shardings=(self.sharding, self.batch_sharding),
                            out_shardings=(self.sharding, NamedSharding(mesh, P())))

    def init(self):
        """The initial state (computed once per optimizer) placed with this mesh's shardings."""
        return jax.device_put(_initial_state(self.name), self.sharding)

    def run(self, state, batches):
        losses = []
        for b in batches:
            state, loss = self.step(state, {k: jax.device_put(v, self.batch_sharding[k])
                                            for k, v in b.items()})
            losses.append(float(loss))
        return state, losses


@functools.cache
def _initial_state(name: str):
    """Host copy of ``(params, tx.init(params))`` for optimizer ``name``."""
    tx = _tx(name)

    def init():
        _, params = nnx.split(Llama(CFG, rngs=nnx.Rngs(0)), nnx.Param)
        return params, tx.init(params)

    return jax.device_get(jax.jit(init)())


@functools.cache
def _harness(name: str, shape: tuple[int, int, int]) -> Harness:
    """One compiled harness per (optimizer, mesh), shared by the tests."""
    return Harness(name, _mesh(shape))


# A two-layer model (GaLore projects the 2-D leaves under "mlp"): cheap to compile,
# so every optimizer x mesh pair runs; the LLaMA runs below cover the model's rules.
MLP_AXES = {"mlp": {"up": ("embed", "mlp"), "down": ("mlp", "embed")}, "bias": ("mlp",)}
D, F = 32, 64


def _mlp_params(key):
    k1, k2 = jax.random.split(key)
    return {"mlp": {"up": 0.2 * jax.random.normal(k1, (D, F)),
                    "down": 0.2 * jax.random.normal(k2, (F, D))},
            "bias": jnp.zeros((F,))}


def _mlp_loss(params, x):
    h = jnp.tanh(x @ params["mlp"]["up"] + params["bias"])
    return jnp.mean((h @ params["mlp"]["down"] - jnp.roll(x, 1, axis=-1)) ** 2)


def _mlp_run(name: str, shape: tuple[int, int, int], xs: np.ndarray):
    mesh = _mesh(shape)
    tx = _tx(name)
    params = _mlp_params(jax.random.PRNGKey(0))
    pspecs = sh.param_specs(params, mesh, logical_axes=MLP_AXES)
    shard = sh.named_shardings((pspecs, sh.optimizer_state_specs(tx, params, pspecs, mesh)),
                               mesh)
    xs_shard = NamedSharding(mesh, sh.batch_spec(mesh))

    @functools.partial(jax.jit, in_shardings=(shard, xs_shard),
                       out_shardings=(shard, NamedSharding(mesh, P())))
    def step(state, x):
        loss, grads = jax.value_and_grad(_mlp_loss)(state[0], x)
        updates, opt_state = tx.update(grads, state[1], state[0])
        return (optax.apply_updates(state[0], updates), opt_state), loss

    state = jax.device_put((params, tx.init(params)), shard)
    before = _signature(state)
    losses = []
    for x in xs:
        state, loss = step(state, jax.device_put(x, xs_shard))
        losses.append(float(loss))
    assert before == _signature(state)   # types, shapes, dtypes, shardings unchanged
    return losses, (_local_bytes(state[0]), _local_bytes(state[1]))


@pytest.mark.parametrize("name", ["galore_adamw", "fira_adamw", "adamw"])
def test_optimizers_on_meshes_match_one_device(name):
    xs = np.random.default_rng(2).standard_normal((STEPS, BATCH, D)).astype(np.float32)
    ref, _ = _mlp_run(name, (1, 1, 1), xs)
    sizes = {}
    for shape in MESHES + [(4, 2, 1)]:
        losses, sizes[shape] = _mlp_run(name, shape, xs)
        np.testing.assert_allclose(losses, ref, rtol=2e-5, atol=1e-7)
        print(f"{name} mlp mesh(data,fsdp,tensor)={shape}: per-device params {sizes[shape][0]} "
              f"B, optimizer state {sizes[shape][1]} B")
    for k in (0, 1):   # fsdp 1 -> 2 -> 4
        assert sizes[(8, 1, 1)][k] > sizes[(4, 2, 1)][k] > sizes[(2, 4, 1)][k]
        assert sizes[(2, 2, 2)][k] < sizes[(8, 1, 1)][k]


def _local_bytes(tree) -> int:
    """Bytes of ``tree`` that device 0 holds."""
    dev = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree)
               for s in x.addressable_shards if s.device == dev)


def _signature(tree):
    return jax.tree.map(lambda x: (type(x).__name__, x.shape, x.dtype, x.sharding), tree)


def test_llama_galore_on_mesh_matches_one_device():
    name = "galore_adamw"
    batches = _batches(STEPS)
    one = _harness(name, (1, 1, 1))
    _, ref = one.run(one.init(), batches)
    per_device = {}
    for shape in [(2, 2, 2)]:
        h = _harness(name, shape)
        state = h.init()
        before = _signature(state)
        state, losses = h.run(state, batches)
        # state types, shapes, dtypes and shardings unchanged by the updates
        assert jax.tree.structure(before) == jax.tree.structure(_signature(state))
        assert before == _signature(state)
        np.testing.assert_allclose(losses, ref, rtol=2e-5, atol=2e-6)
        per_device[shape] = (_local_bytes(state[0]), _local_bytes(state[1]))
        print(f"{name} mesh(data,fsdp,tensor)={shape}: per-device params "
              f"{per_device[shape][0]} B, optimizer state {per_device[shape][1]} B")
    # the analytic per-device bytes fall strictly as fsdp grows 1 -> 2 -> 4
    abstract = one.abstract
    sizes = []
    for fsdp in (1, 2, 4):
        mesh = {"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1}
        ps = sh.param_specs(abstract[0], mesh)
        sizes.append(sh.per_device_nbytes(abstract, (ps, sh.optimizer_state_specs(
            one.tx, abstract[0], ps, mesh)), mesh))
    assert sizes[0] > sizes[1] > sizes[2]


@pytest.mark.parametrize("projector", ["svd", "sara", "dct", "random"])
def test_projector_refresh_on_sharded_gradient(projector):
    rng = np.random.default_rng(1)
    g = rng.standard_normal((32, 64)).astype(np.float32)   # kernel (in, out): reduce in
    r = 4
    tx = scale_by_lowrank(scale_by_reference_adam(), rank=r, projector=projector, seed=3)
    params = {"w": jnp.zeros((32, 64))}
    mesh = _mesh((2, 2, 2))
    spec = {"w": P("fsdp", "tensor")}
    ospecs = sh.optimizer_state_specs(tx, params, spec, mesh)
    shard = sh.named_shardings((spec, ospecs), mesh)
    upd = jax.jit(lambda g, s: tx.update(g, s), in_shardings=shard,
                  out_shardings=shard)
    state = jax.device_put(tx.init(params), shard[1])
    out, state = upd(jax.device_put({"w": g}, shard[0]), state)
    assert state.projector["w"] is not None
    ref_out, ref_state = jax.jit(lambda g, s: tx.update(g, s))({"w": jnp.asarray(g)},
                                                                tx.init(params))
    np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(ref_out["w"]),
                               rtol=1e-4, atol=1e-6)
    got = jax.tree.leaves(state.projector["w"])[0]
    want = jax.tree.leaves(ref_state.projector["w"])[0]
    if projector == "dct":
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        # NumPy: orthonormal DCT-II matrix Q (d x d), scores sum_i |(G^T Q)[i, j]|
        d = 32
        k, j = np.meshgrid(np.arange(d), np.arange(d), indexing="ij")
        q = np.sqrt(2.0 / d) * np.cos(np.pi * k * (2 * j + 1) / (2 * d))
        q[0] *= np.sqrt(0.5)
        scores = np.abs(g.T @ q).sum(axis=0)
        assert set(np.asarray(got).tolist()) == set(np.argsort(-scores)[:r].tolist())
    else:
        np.testing.assert_allclose(np.asarray(got) @ np.asarray(got).T,
                                   np.asarray(want) @ np.asarray(want).T, atol=1e-5)
    if projector == "svd":
        u = np.linalg.svd(g.astype(np.float64))[0][:, :r]
        b = np.asarray(got, np.float64)
        np.testing.assert_allclose(b @ b.T, u @ u.T, atol=1e-4)


@pytest.mark.slow
def test_restore_onto_other_meshes_continues_bit_identically(tmp_path):
    batches = _batches(4)
    big = _harness("galore_adamw", (2, 2, 2))
    state, _ = big.run(big.init(), batches[:2])
    store = CheckpointStore(tmp_path / "checkpoints",
                            CheckpointConfig(every=1, keep=1, async_save=False))
    store.save(2, state, {}, {})
    store.wait()
    host_state = jax.device_get(state)
    for shape in [(1, 2, 1), (1, 1, 1)]:
        small = _harness("galore_adamw", shape)
        restored = store.restore_latest(small.abstract)
        assert restored is not None and restored.step == 2
        assert _signature(restored.state) == _signature(
            jax.device_put(host_state, small.sharding))
        direct, want = small.run(jax.device_put(host_state, small.sharding), batches[2:])
        cont, got = small.run(restored.state, batches[2:])
        assert got == want
        for a, b in zip(jax.tree.leaves(cont), jax.tree.leaves(direct)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    store.close()
