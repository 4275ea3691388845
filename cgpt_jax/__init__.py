"""cgpt-jax: Cerebras-GPT in Flax NNX with every parallelism layout expressed on one device mesh."""
