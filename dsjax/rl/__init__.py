"""Post-training: R1's recipe (cold-start SFT, then GRPO with verifiable rewards)."""
