"""Reinforcement learning and distillation: DeepSeekMath's GRPO (and Dr. GRPO, DAPO, BNPO, GSPO),
R1's rule-based rewards on any dataset, R1's distillation into smaller models. The commands
`nanoseek grpo` and `nanoseek distill` are in cli/.

    losses.py    advantages (group/batch/no scale); GRPO, Dr. GRPO, DAPO, BNPO losses; token or
                 sequence (GSPO) ratios; truncation mask; k3 KL; distillation KLs
    rewards.py   fn(prompts, completions, **columns): accuracy, math, format, overlong, length,
                 code (sandboxed), verifier process, plug-ins
    sandbox.py   model-written code in its own PID/mount/network namespaces, read-only, limited
    rollouts.py  sample groups with the engine, score them, lay them out, log-probabilities
    lora.py      peft LoRA on attention and dense/shared-expert projections; merge and unload
    grpo.py      the GRPO step and loop (one process or torchrun)
    distill.py   distillation: SFT on a teacher's rejection-sampled traces, or on its logits
"""
