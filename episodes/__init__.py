"""Real few-shot benchmarks and seeded episodic sampling; knows nothing of models."""

from episodes.classes import ClassImages
from episodes.download import DownloadError, download_omniglot
from episodes.integrity import CacheError, ChecksumError
from episodes.lake import LakeRuns, load_lake_runs
from episodes.miniimagenet import load_miniimagenet, read_ravi_csv
from episodes.omniglot import load_omniglot, omniglot_alphabets
from episodes.photo import PhotoAugmentation
from episodes.sampler import Episode, EpisodeSampler, FixedEpisodes, IndexEpisode, Task, gather

__all__ = [
    "ClassImages",
    "Episode",
    "EpisodeSampler",
    "FixedEpisodes",
    "IndexEpisode",
    "PhotoAugmentation",
    "Task",
    "gather",
    "load_miniimagenet",
    "read_ravi_csv",
    "CacheError",
    "ChecksumError",
    "DownloadError",
    "LakeRuns",
    "download_omniglot",
    "load_lake_runs",
    "load_omniglot",
    "omniglot_alphabets",
]
