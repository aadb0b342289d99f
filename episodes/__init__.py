"""Real few-shot benchmarks and seeded episodic sampling; knows nothing of models."""

from episodes.classes import ClassImages
from episodes.miniimagenet import load_miniimagenet, read_ravi_csv
from episodes.sampler import Episode, EpisodeSampler, FixedEpisodes, IndexEpisode, Task, gather

__all__ = [
    "ClassImages",
    "Episode",
    "EpisodeSampler",
    "FixedEpisodes",
    "IndexEpisode",
    "Task",
    "gather",
    "load_miniimagenet",
    "read_ravi_csv",
]
