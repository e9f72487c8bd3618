"""Reinforcement learning and distillation: DeepSeekMath's GRPO, R1's rule-based rewards, R1's
distillation into smaller models.

    losses.py   group-relative advantages; GRPO, Dr. GRPO and DAPO losses; k3 KL; distillation KLs
    rewards.py  accuracy, format (<think> opened by the template), code (sandboxed), plug-ins
    sandbox.py  model-written code in a separate process with CPU, memory, output and wall limits
    grpo.py     `nanoseek grpo`: sample groups with the engine on the live weights, score, update
    distill.py  `nanoseek distill`: SFT on a teacher's rejection-sampled traces, or on its logits
"""
