"""``lowrank-study``: train every method x scale x seed of a study config, evaluate them
downstream, analyse every scale and write one report (:mod:`analysis.study.cli`)."""
