"""Optimizer update time and state bytes: galore_adamw vs optax.adamw vs optax.contrib.galore.

LLaMA-20M-like shapes (hidden 256, ffn 688, 4 layers, vocab 256, Flax layout).
Each optimizer's jitted update is timed interleaved with the others in rounds (so
machine noise hits all alike; each timed call follows an untimed one, so XLA's
thread pool is awake), and both the fastest round (``timeit``'s convention) and the
median are reported:

* between refreshes: the update on a step that does not recompute projectors;
* a refresh step: the update that recomputes every projector;
* amortized over T: ``((T - 1) * between + refresh) / T``;
* products only (floor): the two matrix products per projected matrix that any
  GaLore step needs between refreshes, and nothing else.

Run: ``.venv/bin/python benchmarks/optimizer_step.py [--rank 64] [--gap 200] [--rounds 30]``

``--ranks 16 32 64`` prints the between-refresh time of galore_adamw and of the
products alone at each rank against optax.adamw (where GaLore's step becomes cheaper
than AdamW's on this machine).

``--methods`` adds every other alias of ``lowrank_jax.alias.OPTIMIZERS`` (APOLLO,
APOLLO-Mini, FRUGAL, Flora, GaLore-AdamW8bit, ...) to the table.

``--memory llama_7b`` prints every alias's optimizer-state bytes for the projected
matrices of a preset against AdamW's for the same matrices (APOLLO-Mini: < 0.1%).

``--rsvd`` instead times one projector refresh, randomized SVD (``"rsvd"``) vs the
exact SVD (``"svd"``), at GaLore preset shapes (the MLP ``(k, d)`` matrix whose ``d``
is reduced, with GaLore's rank: 60M ``1376 x 512`` r 128, 130M ``2048 x 768`` r 256,
350M ``2736 x 1024`` r 256, 1B ``5461 x 2048`` r 512) on a
GaLore-like test gradient (power-law spectrum ``sigma_i = i^-1`` with Gaussian
singular vectors, plus 1% noise), and prints the subspace overlap of the two.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

# LAPACK (SVD, QR, eigh) through a multi-threaded OpenBLAS oversubscribes small CPU
# machines badly (100x slower on 2 busy cores); one BLAS thread is the fair setting.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import optax
from optax import contrib

import lowrank_jax as lj

HIDDEN, FFN, LAYERS, VOCAB = 256, 688, 4, 256


def llama20m_params() -> dict:
    """Parameter shapes of the LLaMA-20M-like model (Flax (in, out) kernels)."""
    key = iter(jax.random.split(jax.random.key(0), 64))
    normal = lambda shape: 0.02 * jax.random.normal(next(key), shape)
    layers = {}
    for i in range(LAYERS):
        layers[str(i)] = {
            "attn": {n: normal((HIDDEN, HIDDEN)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {"gate_proj": normal((HIDDEN, FFN)), "up_proj": normal((HIDDEN, FFN)),
                    "down_proj": normal((FFN, HIDDEN))},
            "attn_norm": jnp.ones(HIDDEN), "mlp_norm": jnp.ones(HIDDEN)}
    return {"embed": normal((VOCAB, HIDDEN)), "layers": layers, "final_norm": jnp.ones(HIDDEN),
            "lm_head": normal((HIDDEN, VOCAB))}


RSVD_SHAPES = ((1376, 512, 128), (2048, 768, 256), (2736, 1024, 256), (5461, 2048, 512))


def galore_like_gradient(k: int, d: int, seed: int = 0) -> jax.Array:
    """``(k, d)`` float32 matrix with a power-law spectrum and 1% Gaussian noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    m = min(k, d)
    u = rng.standard_normal((k, m), np.float32) / np.sqrt(k)
    v = rng.standard_normal((d, m), np.float32) / np.sqrt(d)
    x = (u * (1.0 / np.arange(1, m + 1, dtype=np.float32))) @ v.T
    x += 0.01 * np.abs(x).mean() * rng.standard_normal((k, d), np.float32)
    return jnp.asarray(x)


def rsvd_benchmark(repeats: int) -> None:
    """Time one refresh, rSVD vs exact SVD (interleaved), and the subspace overlap.

    Each repeat times one call of each method right after an untimed one. Speed-ups
    are given from the fastest repeat of each (``timeit``'s convention:
    slower repeats measure interference from other processes, which on a shared
    2-core machine comes in bursts of up to 2x) and from the medians.
    """
    from lowrank_jax.projectors import PROJECTORS

    print(f"projector refresh, {repeats} interleaved repeats "
          f"({jax.devices()[0].platform}, rsvd = {PROJECTORS['rsvd']})")
    print(f"{'x shape (k, d)':>16s} {'rank':>5s} {'svd ms min/med':>15s} "
          f"{'rsvd ms min/med':>16s} {'x (min)':>8s} {'x (med)':>8s} {'overlap':>8s}")
    by_min, by_median, overlaps = [], [], []
    for k, d, r in RSVD_SHAPES:
        x = galore_like_gradient(k, d)
        prev = jnp.zeros((d, r), jnp.float32)
        fns = {name: jax.jit(lambda key, x, name=name, r=r, prev=prev: PROJECTORS[name].compute(
            key, x, r, prev, 0)) for name in ("svd", "rsvd")}
        key = jax.random.key(0)
        bases = {name: jax.block_until_ready(fn(key, x)) for name, fn in fns.items()}
        # each timed call follows an untimed one: it runs with the thread pool awake, as a
        # refresh inside a training step does (not right after the other method's
        # single-threaded LAPACK call, which lets XLA's workers sleep)
        calls = {name: functools.partial(fn, key, x) for name, fn in fns.items()}
        samples = _interleaved(calls, repeats)
        fast = {name: min(v) for name, v in samples.items()}
        med = {name: statistics.median(v) for name, v in samples.items()}
        ov = float(lj.subspace_overlap(bases["svd"], bases["rsvd"]))
        by_min.append(fast["svd"] / fast["rsvd"])
        by_median.append(med["svd"] / med["rsvd"])
        overlaps.append(ov)
        print(f"{f'{k} x {d}':>16s} {r:5d} {fast['svd']:7.1f}/{med['svd']:7.1f} "
              f"{fast['rsvd']:7.1f}/{med['rsvd']:7.1f} {by_min[-1]:7.1f}x {by_median[-1]:7.1f}x "
              f"{ov:8.4f}")
    print(f"mean overlap {statistics.mean(overlaps):.4f}; speed-up (min) {min(by_min):.1f}x to "
          f"{max(by_min):.1f}x; speed-up (median) {min(by_median):.1f}x to {max(by_median):.1f}x")


def memory_table(preset: str) -> None:
    """State bytes of every alias for the projected matrices of ``preset``, vs AdamW's."""
    from lowrank_jax.alias import OPTIMIZERS
    from lowrank_jax.memory import projected_state_report

    print(f"{preset}: optimizer state for the projected matrices only (default ranks)")
    print(f"{'optimizer':20s} {'state GiB':>10s} {'AdamW GiB':>10s} {'ratio':>9s}")
    for name in OPTIMIZERS:
        r = projected_state_report(preset, name)
        print(f"{name:20s} {r['state_bytes'] / 2**30:10.3f} "
              f"{r['adamw_state_bytes'] / 2**30:10.3f} {r['ratio']:9.5f}")


def projection_floor(params: dict, labels: dict, rank: int):
    """The products any GaLore step needs between refreshes, and nothing else.

    For each projected matrix, ``P (P^T G)`` (or ``(G P) P^T`` when the second
    dimension is the smaller one) with a fixed orthonormal ``P`` of GaLore's shape:
    a lower bound on ``galore_adamw``'s between-refresh update on this machine.
    """
    def basis(g):
        d = min(g.shape)
        q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (d, min(rank, d))))
        return q

    flat_labels = jax.tree.leaves(labels)
    picked = [i for i, lab in enumerate(flat_labels) if lab == "lowrank"]
    bases = [basis(jax.tree.leaves(params)[i]) for i in picked]

    def products(grads):
        leaves = jax.tree.leaves(grads)
        return [b @ (b.T @ g) if g.shape[0] <= g.shape[1] else (g @ b) @ b.T
                for g, b in zip([leaves[i] for i in picked], bases)]

    return jax.jit(products)


def _interleaved(fns: dict, rounds: int) -> dict:
    """``{name: [ms, ...]}``: each round calls every function once untimed, then timed."""
    samples: dict = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn())
    for _ in range(rounds):
        for name, fn in fns.items():
            jax.block_until_ready(fn())
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def rank_sweep(ranks: list[int], rounds: int) -> None:
    """Between-refresh time of galore_adamw and of the projection products vs optax.adamw."""
    params = llama20m_params()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    labels = lj.default_lowrank_labels(params)
    adamw = optax.adamw(1e-3, weight_decay=0.0)
    fns = {"optax.adamw": _update_after_first(adamw, params, grads)}
    for r in ranks:
        fns[f"galore_adamw r={r}"] = _update_after_first(
            lj.galore_adamw(1e-3, rank=r, update_proj_gap=10**6), params, grads)
        floor = projection_floor(params, labels, r)
        fns[f"products only r={r}"] = lambda floor=floor: floor(grads)
    samples = _interleaved(fns, rounds)
    base_min, base_med = min(samples["optax.adamw"]), statistics.median(samples["optax.adamw"])
    print(f"between refreshes vs optax.adamw ({base_min:.2f} ms min, {base_med:.2f} ms median), "
          f"{rounds} rounds")
    print(f"{'':24s} {'ms min':>8s} {'ms med':>8s} {'x adamw (min)':>14s} {'x adamw (med)':>14s}")
    for name, v in samples.items():
        print(f"{name:24s} {min(v):8.2f} {statistics.median(v):8.2f} {min(v) / base_min:14.2f} "
              f"{statistics.median(v) / base_med:14.2f}")


def _update_after_first(tx, params, grads):
    """A no-argument function running ``tx``'s jitted update on the state after one step."""
    update = jax.jit(tx.update)
    _, state = update(grads, tx.init(params), params)
    return lambda: update(grads, state, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--methods", action="store_true",
                        help="also time every other optimizer of lowrank_jax.alias.OPTIMIZERS")
    parser.add_argument("--rsvd", action="store_true",
                        help="time one projector refresh, rSVD vs exact SVD, and exit")
    parser.add_argument("--repeats", type=int, default=9, help="repeats of --rsvd timings")
    parser.add_argument("--ranks", type=int, nargs="+", default=None,
                        help="between-refresh time of galore_adamw and of its projection "
                             "products at these ranks, vs optax.adamw, and exit")
    parser.add_argument("--memory", metavar="PRESET", default=None,
                        help="print every method's state bytes for PRESET's projected matrices "
                             "against AdamW's (each alias at its default rank) and exit")
    args = parser.parse_args()
    if args.rsvd:
        rsvd_benchmark(args.repeats)
        return
    if args.memory:
        memory_table(args.memory)
        return
    if args.ranks:
        rank_sweep(args.ranks, args.rounds)
        return

    params = llama20m_params()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    labels = lj.default_lowrank_labels(params)
    contrib_dims = jax.tree.map(
        lambda lab: contrib.GaLoreDimensionNumbers(0, 1) if lab == "lowrank" else None, labels)
    optimizers = {
        "optax.adamw": optax.adamw(1e-3, weight_decay=0.0),
        "optax.contrib.galore": contrib.galore(
            1e-3, rank=args.rank, update_proj_gap=args.gap, weight_dimension_numbers=contrib_dims),
        "galore_adamw": lj.galore_adamw(1e-3, rank=args.rank, update_proj_gap=args.gap),
    }
    if args.methods:
        from lowrank_jax.alias import OPTIMIZERS

        for name, make in OPTIMIZERS.items():
            if name not in optimizers and name != "adamw":
                rank = 1 if name == "apollo_mini" else args.rank  # APOLLO-Mini is rank 1
                optimizers[name] = make(1e-3, rank=rank, update_proj_gap=args.gap)
    nbytes, fns = {}, {}
    for name, tx in optimizers.items():
        state = tx.init(params)
        nbytes[name] = lj.state_nbytes(state)
        update = jax.jit(tx.update)
        _, after_first = update(grads, state, params)          # compile + first refresh
        fns[f"{name}/between"] = lambda u=update, s=after_first: u(grads, s, params)
        fns[f"{name}/refresh"] = lambda u=update, s=state: u(grads, s, params)
    floor_fn = projection_floor(params, labels, args.rank)
    fns["products only"] = lambda: floor_fn(grads)
    samples = _interleaved(fns, args.rounds)
    stat = {"min": min, "med": statistics.median}
    between = {k: {n: f(samples[f"{n}/between"]) for n in optimizers} for k, f in stat.items()}
    ref = {k: {n: f(samples[f"{n}/refresh"]) for n in optimizers} for k, f in stat.items()}
    amort = {k: {n: ((args.gap - 1) * between[k][n] + ref[k][n]) / args.gap for n in optimizers}
             for k in stat}
    print(f"LLaMA-20M-like shapes (hidden {HIDDEN}, ffn {FFN}, {LAYERS} layers), rank "
          f"{args.rank}, T={args.gap}, {args.rounds} interleaved rounds, "
          f"{jax.devices()[0].platform}; ratios from the fastest round (min) and the median")
    print(f"{'optimizer':24s} {'between ms':>11s} {'refresh ms':>11s} {'amortized ms':>13s} "
          f"{'x adamw between':>16s} {'x adamw amort.':>15s} {'state MB':>9s} "
          f"{'x adamw state':>14s}")
    print(f"{'':24s} {'min/med':>11s} {'min/med':>11s} {'min/med':>13s} {'min/med':>16s} "
          f"{'min/med':>15s}")
    for name in optimizers:
        b = {k: between[k]["optax.adamw"] for k in stat}
        print(f"{name:24s} {between['min'][name]:5.2f}/{between['med'][name]:5.2f} "
              f"{ref['min'][name]:5.0f}/{ref['med'][name]:5.0f} "
              f"{amort['min'][name]:6.2f}/{amort['med'][name]:6.2f} "
              f"{between['min'][name] / b['min']:8.2f}/{between['med'][name] / b['med']:5.2f} "
              f"{amort['min'][name] / b['min']:7.2f}/{amort['med'][name] / b['med']:5.2f} "
              f"{nbytes[name] / 2**20:9.2f} {nbytes[name] / nbytes['optax.adamw']:14.3f}")
    floor = samples["products only"]
    print(f"{'products only (floor)':24s} {min(floor):5.2f}/{statistics.median(floor):5.2f}"
          f"{'':32s}{min(floor) / between['min']['optax.adamw']:8.2f}/"
          f"{statistics.median(floor) / between['med']['optax.adamw']:5.2f}")
    med, amort = between["med"], amort["med"]
    g, c = "galore_adamw", "optax.contrib.galore"
    print(f"galore_adamw / optax.contrib.galore: between {med[g] / med[c]:.2f}x, "
          f"amortized {amort[g] / amort[c]:.2f}x")


if __name__ == "__main__":
    main()
