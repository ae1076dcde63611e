"""Meshes, the one logical-axis rules table, and the code that runs per shard (collectives, the
expert-parallel exchange); the model names axes logically and never a mesh axis."""
