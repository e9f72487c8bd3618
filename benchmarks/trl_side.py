"""TRL's GRPOTrainer beside nanoseek's GRPO: the same checkpoint, prompts in the same order, reward
and settings (bench_rl.py --vs-trl).

    from trl_side import run_trl
    timing = run_trl(sft_folder, out_folder, examples, settings)   # examples: the prompts, in step order

The checkpoint is the one nanoseek's cold start saved, loaded by transformers
(`AutoModelForCausalLM`, DeepseekV3ForCausalLM for the tiny preset) with the tokenizer.json nanoseek
wrote. Prompts are rendered by nanoseek (data.prompts.render_prompt) and handed to TRL as plain text
without the BOS marker, which the transformers tokenizer adds itself; the token ids TRL will see are
checked against nanoseek's before training starts. The reward is nanoseek's own accuracy reward,
called through a small adapter that gives it each prompt's Example, exactly as nanoseek's trainer
does. The trained model is written to out_folder/model as a Hugging Face checkpoint (nanoseek loads
it for the held-out evaluation, so both sides are evaluated by the same code).

Timing: seconds per optimizer step from a TrainerCallback (on_step_begin -> on_step_end, which in
TRL's GRPO includes generation, scoring and the update); rollout seconds and tokens by wrapping the
model's `generate` (tokens counted up to and including each row's first EOS, as TRL's completion
mask counts them).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch


def _timed_generate(model, eos_id: int, log: list):
    """Wrap model.generate: append (seconds, completion tokens) of each call to `log`."""
    generate = model.generate

    def wrapper(*args, **kwargs):
        prompt_len = kwargs["input_ids"].shape[1] if "input_ids" in kwargs else args[0].shape[1]
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        seconds = time.perf_counter() - t0
        new = out[:, prompt_len:]
        is_eos = new == eos_id
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], new.shape[1],
                                                                                        dtype=torch.long))
        log.append((seconds, int(first.sum())))
        return out

    model.generate = wrapper


def _prompts(folder: Path, examples: list, layout: str) -> list[str]:
    """The prompts as TRL gets them, checked to tokenize to exactly nanoseek's ids."""
    from transformers import AutoTokenizer

    from nanoseek.data.prompts import render_prompt
    from nanoseek.tokenizer import Tokenizer

    ours, theirs = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    bos = ours.decode([ours.bos_id]) if ours.bos_id is not None else ""
    texts = []
    for ex in examples:
        text, ids = render_prompt(ours, ex, layout)
        text = text[len(bos):] if bos and text.startswith(bos) else text
        if theirs(text=text)["input_ids"] != ids:
            raise ValueError(f"transformers tokenizes the prompt {text!r} differently from nanoseek")
        texts.append(text)
    return texts


def run_trl(folder: str | Path, out: str | Path, examples: list, settings: dict, layout: str = "chat") -> dict:
    """TRL GRPO from `folder` on `examples` (len = steps x prompts_per_step, in step order).

    settings: prompts_per_step, group_size, max_new_tokens, lr, beta, eps, temperature, seed, threads.
    Returns per-step seconds, rollout (seconds, tokens) per step and the logged rewards."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from nanoseek.rl.rewards import accuracy_reward

    folder, out = Path(folder), Path(out)
    s = settings
    steps = len(examples) // s["prompts_per_step"]
    texts = _prompts(folder, examples, layout)
    data = Dataset.from_dict({"prompt": texts, "row": list(range(len(examples)))})

    def accuracy(prompts, completions, row, **_):
        """nanoseek's accuracy reward with each completion's Example, as nanoseek's trainer calls it."""
        picked = [examples[i] for i in row]
        return accuracy_reward(prompts, completions, answer=[e.answer for e in picked], example=picked)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rollouts: list = []
    _timed_generate(model, tokenizer.eos_token_id, rollouts)
    step_s: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            torch.set_num_threads(s["threads"])  # whatever the trainer's setup did, the same threads as nanoseek

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.perf_counter() - self.t0)

    G = s["group_size"]
    config = GRPOConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=s["prompts_per_step"] * G,
        gradient_accumulation_steps=1, num_generations=G, max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"], top_p=1.0, learning_rate=s["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=s["beta"], epsilon=s["eps"], num_iterations=1, loss_type="grpo", scale_rewards="group",
        shuffle_dataset=False, use_cpu=True, bf16=False, seed=s["seed"], logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[Clock()])
    torch.set_num_threads(s["threads"])
    trainer.train()
    del model.generate  # the timing wrapper (an instance attribute) off again before saving
    trainer.save_model(str(out / "model"))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # nanoseek's own tokenizer files, unchanged
        shutil.copy(folder / name, out / "model" / name)
    logs = [r for r in trainer.state.log_history if "reward" in r]
    return {"steps": len(step_s), "step_s": step_s, "rollout_s": [r[0] for r in rollouts],
            "rollout_tokens": [r[1] for r in rollouts], "reward": [r["reward"] for r in logs],
            "threads": torch.get_num_threads()}
