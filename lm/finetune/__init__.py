"""Stage 4: supervised fine-tuning, adapters, domain adaptation, reward models, DPO, PPO, GRPO."""
