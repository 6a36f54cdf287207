"""Bad input to the Python API: each case raises a clear one-line exception naming the culprit.

Every case builds (and where needed initialises or steps) an optimizer with one bad value
and checks the exception type, that the message is a single line, and that it contains the
parameter or leaf it is about (and, where there is one, the fix).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import lowrank_jax as lj
from lowrank_jax.adam_mini import AdamMiniNames

PARAMS = {"attn": {"q": jnp.ones((16, 8))}, "mlp": {"up": jnp.ones((8, 24))}, "norm": jnp.ones(8)}
NAN, INF = float("nan"), float("inf")


def _init(tx, params=PARAMS):
    return tx.init(params)


def _step_with(grads):
    tx = lj.galore_adamw(1e-2, rank=2)
    state = tx.init(PARAMS)
    return tx.update(grads, state, PARAMS)


CASES = [
    # (id, callable, exception type, substrings the message must contain)
    ("integer params", lambda: _init(lj.galore_adamw(1e-2, rank=2),
                                     {"attn": {"q": jnp.ones((16, 8), jnp.int32)}}),
     ValueError, ["'attn/q'", "int32", "floating-point"]),
    ("state_nbytes of a string", lambda: lj.state_nbytes("string"), TypeError,
     ["state_nbytes", "str", "pytree of arrays"]),
    ("state_nbytes of an object", lambda: lj.state_nbytes({"a": object()}), TypeError,
     ["state_nbytes", "object"]),
    ("gradient shape mismatch", lambda: _step_with(
        {"attn": {"q": jnp.ones((16, 9))}, "mlp": {"up": jnp.ones((8, 24))},
         "norm": jnp.ones(8)}), ValueError, ["'attn/q'", "(16, 9)", "(16, 8)"]),
    ("gradient tree mismatch", lambda: _step_with({"attn": {"q": jnp.ones((16, 8))}}),
     ValueError, ["gradients", "'mlp/up'"]),
    ("rank 0", lambda: lj.galore_adamw(1e-2, rank=0), ValueError, ["rank must be an int >= 1"]),
    ("rank float", lambda: lj.galore_adamw(1e-2, rank=2.5), ValueError, ["rank", "2.5"]),
    ("rank bool", lambda: lj.galore_adamw(1e-2, rank=True), ValueError, ["rank"]),
    ("update_proj_gap 0", lambda: lj.fira_adamw(1e-2, update_proj_gap=0), ValueError,
     ["update_every must be an int >= 1"]),
    ("scale nan", lambda: lj.galore_adamw(1e-2, scale=NAN), ValueError,
     ["scale must be a finite number"]),
    ("scale inf", lambda: lj.apollo_adamw(1e-2, scale=INF), ValueError,
     ["scale must be a finite number"]),
    ("learning rate nan", lambda: lj.galore_adamw(NAN), ValueError,
     ["learning_rate must be a finite number"]),
    ("learning rate inf", lambda: lj.adamw(INF), ValueError,
     ["learning_rate must be a finite number"]),
    ("learning rate negative", lambda: lj.flora(-1.0), ValueError, ["learning_rate must be >= 0"]),
    ("weight decay nan", lambda: lj.dct_adamw(1e-2, weight_decay=NAN), ValueError,
     ["weight_decay must be a finite number"]),
    ("b1 = 1", lambda: lj.adam_mini(1e-2, b1=1.0), ValueError, ["b1 must be < 1.0"]),
    ("eps negative", lambda: lj.sara_adamw(1e-2, eps=-1.0), ValueError, ["eps must be >= 0"]),
    ("density 0", lambda: lj.frugal_projection(1e-2, density=0.0), ValueError,
     ["density must be a number in (0, 1]"]),
    ("density 1.5", lambda: lj.frugal(1e-2, density=1.5), ValueError,
     ["density must be a number in (0, 1]"]),
    ("density nan", lambda: lj.frugal_projection(1e-2, density=NAN), ValueError, ["density"]),
    ("density too small for a leaf", lambda: _init(lj.frugal_projection(1e-2, density=0.01)),
     ValueError, ["density=0.01 gives rank 0", "'attn/q'"]),
    ("rank and density", lambda: lj.frugal_projection(1e-2, rank=2, density=0.5), ValueError,
     ["rank or density, not both"]),
    ("unknown optimizer", lambda: lj.validate_alias_kwargs("galore_adam", {}), ValueError,
     ["unknown optimizer 'galore_adam'", "galore_adamw"]),
    ("unknown alias argument", lambda: lj.validate_alias_kwargs("flora", {"scale": 0.5}),
     ValueError, ["optimizer 'flora' has no argument 'scale'"]),
    ("unknown projector", lambda: lj.galore_adamw(1e-2, projector="qr"), ValueError,
     ["projector='qr' is not known", "svd"]),
    ("unknown proj_type", lambda: lj.galore_adamw(1e-2, proj_type="diag"), ValueError,
     ["proj_type='diag'"]),
    ("unknown moments", lambda: lj.galore_adamw(1e-2, moments="forget"), ValueError,
     ["moments='forget'"]),
    ("unknown residual", lambda: lj.scale_by_lowrank(lj.scale_by_reference_adam(), rank=2,
                                                     residual="lion"), ValueError,
     ["residual='lion' is not known"]),
    ("3-D leaf without dimension numbers",
     lambda: _init(lj.galore_adamw(1e-2, rank=2, labels=lambda p: {"attn": {"q": True}}),
                   {"attn": {"q": jnp.ones((8, 2, 4))}}),
     ValueError, ["'attn/q'", "(8, 2, 4)", "dimension_numbers"]),
    ("overlapping dimension numbers",
     lambda: _init(lj.galore_adamw(1e-2, rank=2, labels=lambda p: {"attn": {"q": True}},
                                   dimension_numbers=lj.DimensionNumbers(0, (0, 1))),
                   {"attn": {"q": jnp.ones((8, 2, 4))}}),
     ValueError, ["dimension_numbers", "'attn/q'", "disjoint"]),
    ("fira gamma 0", lambda: lj.fira_adamw(1e-2, gamma=0.0), ValueError, ["gamma must be > 0"]),
    ("apollo scaling", lambda: lj.apollo_adamw(1e-2, scaling="row"), ValueError,
     ["scaling='row'", "channel"]),
    ("mu_dtype not a dtype", lambda: lj.galore_adamw(1e-2, mu_dtype="float7"), ValueError,
     ["mu_dtype='float7' is not a dtype"]),
    ("flora clip threshold nan", lambda: lj.flora(1e-2, clip_threshold=NAN), ValueError,
     ["clip_threshold must be a finite number"]),
    ("one DCT matrix, two sizes",
     lambda: _init(lj.dct_adamw(1e-2, rank=2, one_dct_matrix=True),
                   {"attn": {"q": jnp.ones((16, 8))}, "mlp": {"up": jnp.ones((12, 24))}}),
     ValueError,
     ["one_dct_matrix=True", "'mlp/up'"]),
    ("Adam-mini name field", lambda: AdamMiniNames().extended(ffn=("x",)), ValueError,
     ["AdamMiniNames has no field 'ffn'"]),
    ("rule object with scale", lambda: lj.scale_by_lowrank(
        lj.scale_by_reference_adam(), rank=2, residual=lj.FiraResidual(), scale=0.5),
     ValueError, ["scale= cannot be combined with a residual rule object"]),
    ("full projection with Fira", lambda: lj.fira_adamw(1e-2, proj_type="full"), ValueError,
     ["needs a one-sided proj_type"]),
    ("rank array in inject_hyperparams",
     lambda: lj.galore_adamw(1e-2, rank=jnp.asarray(4)), ValueError, ["static_args"]),
]


@pytest.mark.parametrize("make,exc,parts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_one_clear_line(make, exc, parts):
    with pytest.raises(exc) as err:
        jax.block_until_ready(make())
    text = str(err.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, (part, text)


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20
