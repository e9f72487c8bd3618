"""Reinforcement learning and distillation: DeepSeekMath's GRPO, R1's rule-based rewards, R1's
distillation into smaller models. The commands `nanoseek grpo` and `nanoseek distill` are in cli/.

    losses.py   group-relative advantages; GRPO, Dr. GRPO and DAPO losses; k3 KL; distillation KLs
    rewards.py  accuracy, format (<think> opened by the template), code (sandboxed), plug-ins
    sandbox.py  model-written code in a separate process with CPU, memory, output and wall limits
    grpo.py     GRPO: sample groups with the engine on the live weights, score, update
    distill.py  distillation: SFT on a teacher's rejection-sampled traces, or on its logits
"""
