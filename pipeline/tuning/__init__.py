"""Tuning: DPO/SFT with LoRA (TRL + PEFT), preference pairs, contrastive weight steering."""
