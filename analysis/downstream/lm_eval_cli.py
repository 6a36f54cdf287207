"""``lowrank-lm-eval``: lm-evaluation-harness's own CLI with the ``lowrank-jax`` model registered.

    lowrank-lm-eval --model lowrank-jax --model_args run_dir=runs/x,step=final \\
        --tasks piqa,copa,mrpc,rte,mnli,arc_easy,blimp,sst2 --output_path out/
    python -m analysis.downstream.lm_eval_cli ...        # the same

lm-eval 0.4 has no plug-in discovery for models (its registry holds the models
of ``lm_eval.models`` and whatever an imported module registered; no entry-point
group is read), so a plain ``lm_eval --model lowrank-jax`` cannot find ours. This
wrapper registers it by ``module:Class`` path (nothing heavy is imported until it
is used), keeps lm-eval's own models, then hands every argument to lm-eval's CLI
unchanged. Needs the extra: ``pip install 'lowrank-jax[lm-eval]'``.
"""

from __future__ import annotations

import sys

__all__ = ["main", "register"]

TARGET = "analysis.downstream.lm_eval_model:LowrankJaxLM"


def register() -> None:
    """Put ``lowrank-jax`` into lm-eval's model registry (lazily; lm-eval's models stay)."""
    import lm_eval.models  # noqa: F401 - registers lm-eval's own models first

    try:
        from lm_eval.api.registry import model_registry
    except ImportError:                  # an lm-eval without lazy entries: import the class,
        import analysis.downstream.lm_eval_model  # noqa: F401 - its decorator registers it
        return
    if "lowrank-jax" not in model_registry:
        model_registry.register("lowrank-jax", target=TARGET)


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval's CLI with our model registered; returns the exit status."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("error: lowrank-lm-eval needs lm-evaluation-harness: "
              "pip install 'lowrank-jax[lm-eval]'", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    register()
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SystemExit as exit_:
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
