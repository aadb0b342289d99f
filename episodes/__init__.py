"""Real few-shot benchmarks and seeded episodic sampling; knows nothing of models."""

from episodes.classes import ClassImages

__all__ = ["ClassImages"]
