"""metafilm: few-shot meta-learning with FiLM adaptation."""

__version__ = "0.1.0"
