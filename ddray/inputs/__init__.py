"""What a run reads and derives from its config: the real data (:mod:`~ddray.inputs.sources`), expert
trajectories (:mod:`~ddray.inputs.experts`, ``ddray experts``), pools of pretrained networks
(:mod:`~ddray.inputs.pretrain`, ``ddray pretrain``) and the problem built from them all
(:mod:`~ddray.inputs.problem`: data, model, θ₀ samplers, objective)."""
