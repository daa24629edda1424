"""Stimulus audio: decoded once, mono, 22,050 Hz, cached as memory-mappable arrays.

- :func:`find_stimuli` maps episode ids to files (``friends_s01e02a.wav``, ``.flac``,
  ``.mkv``, ``.mp4``..., searched recursively); full-episode files (``friends_s01e01.mkv``
  beside its halves) and other films are not episodes.  :func:`scan_stimuli` also lists the
  unfetched git-annex links of a datalad clone.
- :func:`decode_audio` decodes one file to a mono float32 waveform at 22,050 Hz.
- :class:`StimulusCache` does that once per file and keeps the result as a ``.npy`` in a
  cache folder; :meth:`StimulusCache.waveform` returns a read-only memory map, so a
  training example can read any stretch of an episode without loading the rest.

Decoding and resampling rules (one path for every format):

- wav / flac are read with :mod:`soundfile` (no FFmpeg needed); video soundtracks (mkv,
  mp4, ...) are decoded with torchcodec's :class:`~torchcodec.decoders.AudioDecoder` at
  their native rate.  An audio stream that starts after the container's time 0 is
  left-padded with zeros so that sample 0 is the episode start.
- Channels are averaged to mono.
- Everything is resampled by **one** resampler, :func:`torchaudio.functional.resample`
  with its defaults (windowed-sinc, Hann window, ``lowpass_filter_width=6``,
  ``rolloff=0.99``), applied once from the file's native rate.  A file already at
  22,050 Hz is not resampled.  (Different resamplers differ by several percent RMS; using
  one everywhere keeps wav- and video-sourced episodes comparable.)
- Amplitudes are left as decoded (float in [-1, 1]); scaling to SoundNet's input range is
  the model's job.

Cache files are named ``<episode>_<key>.npy`` where the key hashes the source's resolved
path, size and modification time, the sample rate and the decoder version; they are
written atomically, and stale versions for the same episode are removed.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from hear_brainsoundnet.soundnet import SAMPLE_RATE  # every waveform handed to training: SoundNet's rate

from ._io import atomic_save_npy, file_identity, hash_key, is_unfetched
from .errors import DataError

__all__ = [
    "AUDIO_EXTENSIONS",
    "SAMPLE_RATE",
    "VIDEO_EXTENSIONS",
    "StimulusCache",
    "decode_audio",
    "find_stimuli",
    "scan_stimuli",
]

logger = logging.getLogger(__name__)

#: Extensions read with soundfile, in order of preference when an episode has several files.
AUDIO_EXTENSIONS = (".wav", ".flac")
#: Extensions decoded with torchcodec (FFmpeg).
VIDEO_EXTENSIONS = (".mkv", ".mp4", ".avi", ".mov", ".webm")
# Bumped when decoding or resampling changes, to invalidate caches.
_DECODER_VERSION = "sf+torchcodec/torchaudio-sinc-hann-w6-r0.99/v1"

_STIMULUS_NAME = re.compile(r"(?:^|_)(?:task-)?(?P<episode>s\d+e\d+[a-z]?)$", re.IGNORECASE)


def _rank(path: Path, order: dict[str, int]) -> tuple:
    return (order[path.suffix.lower()], len(str(path)), str(path))


def _drop_full_episodes(found: dict[str, Path], parted: set[str]) -> dict[str, Path]:
    """Without the full-episode files of episodes that also come in parts.

    friends.stimuli holds ``friends_s01e01.mkv`` beside ``s1/friends_s01e01a.mkv`` and
    ``friends_s01e01b.mkv``: the scanner showed the parts (one fMRI run each), so the full
    episode pairs with no run and only costs decoding time.
    """
    dropped = sorted(episode for episode in found if episode in parted)
    if dropped:
        logger.info(
            "ignoring %d full-episode stimulus file(s) whose episode also comes in parts (one fMRI "
            "run per part): %s",
            len(dropped),
            ", ".join(found[episode].name for episode in dropped[:5]) + (" ..." if len(dropped) > 5 else ""),
        )
    return {episode: path for episode, path in found.items() if episode not in parted}


def scan_stimuli(stimuli_dir: str | Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Stimulus files under ``stimuli_dir``: ``(found, unfetched)``, each episode id -> path.

    ``found`` are readable files (see :func:`find_stimuli` for the naming and preference
    rules); ``unfetched`` are broken git-annex links (a datalad clone's files not yet
    fetched) for episodes with no readable file.  Files of other stimuli sets (Movie10's
    ``bourne01.mkv``...) or other kinds (transcripts' ``.tsv``) match no rule and are ignored.

    Raises
    ------
    DataError
        The folder does not exist.
    """
    folder = Path(stimuli_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: stimuli folder not found")
    order = {ext: i for i, ext in enumerate(AUDIO_EXTENSIONS + VIDEO_EXTENSIONS)}
    found: dict[str, Path] = {}
    unfetched: dict[str, Path] = {}
    for path in folder.rglob("*"):
        suffix = path.suffix.lower()
        if suffix not in order or path.name.startswith("."):
            continue
        match = _STIMULUS_NAME.search(path.stem)
        if match is None:
            continue
        if is_unfetched(path):
            bucket = unfetched
        elif path.is_file():
            bucket = found
        else:
            continue
        episode = match["episode"].lower()
        current = bucket.get(episode)
        if current is None or _rank(path, order) < _rank(current, order):
            bucket[episode] = path
    parted = {episode[:-1] for episode in (*found, *unfetched) if episode[-1].isalpha()}
    found = _drop_full_episodes(dict(sorted(found.items())), parted)
    unfetched = {e: p for e, p in sorted(unfetched.items()) if e not in found and e not in parted}
    return found, unfetched


def find_stimuli(stimuli_dir: str | Path) -> dict[str, Path]:
    """Map episode ids to stimulus files found (recursively) under ``stimuli_dir``.

    A file belongs to episode ``s01e02a`` when its name (without extension) is
    ``s01e02a`` or ends with ``_s01e02a`` (``friends_s01e02a.mkv``).  When one episode has
    several files, audio files win over video files, then :data:`AUDIO_EXTENSIONS` /
    :data:`VIDEO_EXTENSIONS` order, then the shortest path.  A full-episode file
    (``friends_s01e01.mkv``) is ignored when the episode also comes in parts
    (``friends_s01e01a.mkv``...): the fMRI runs are the parts.  Unfetched git-annex links
    are left out (see :func:`scan_stimuli`).

    Raises
    ------
    DataError
        The folder does not exist.
    """
    return scan_stimuli(stimuli_dir)[0]


def _resample(waveform: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """The one resampler of the project (see the module docstring)."""
    if orig_rate == new_rate:
        return waveform
    import torch
    import torchaudio.functional as F

    resampled = F.resample(torch.from_numpy(np.ascontiguousarray(waveform)), orig_rate, new_rate)
    return resampled.numpy()


def _decode_with_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise DataError(f"{path}: cannot decode audio: {exc}") from exc
    return data.mean(axis=1, dtype=np.float32), int(rate)


def _decode_with_torchcodec(path: Path) -> tuple[np.ndarray, int]:
    try:
        from torchcodec.decoders import AudioDecoder
    except (ImportError, RuntimeError, OSError) as exc:  # missing FFmpeg libraries
        raise RuntimeError(
            f"decoding {path} needs torchcodec and the FFmpeg libraries (apt-get install ffmpeg): {exc}"
        ) from exc
    try:
        samples = AudioDecoder(str(path)).get_all_samples()
    except (RuntimeError, ValueError, OSError) as exc:
        raise DataError(f"{path}: cannot decode the audio stream: {exc}") from exc
    rate = int(samples.sample_rate)
    data = samples.data.numpy().mean(axis=0, dtype=np.float32)
    # Keep sample 0 = container time 0 (the start of the episode's video).
    offset = int(round(float(samples.pts_seconds) * rate))
    if offset > 0:
        data = np.concatenate([np.zeros(offset, dtype=np.float32), data])
    elif offset < 0:
        data = data[-offset:]
    return data, rate


def decode_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode a stimulus file to a mono float32 waveform at ``sample_rate``.

    Parameters
    ----------
    path : :obj:`str` or :class:`pathlib.Path`
        A wav/flac file (read with soundfile) or a video/audio container (mkv, mp4, ...:
        decoded with torchcodec).
    sample_rate : :obj:`int`, default=:data:`SAMPLE_RATE`
        Output rate; resampling uses :func:`torchaudio.functional.resample`.

    Returns
    -------
    :class:`numpy.ndarray`
        Shape ``(n_samples,)``, float32.

    Raises
    ------
    DataError
        The file is missing, cannot be decoded, or holds no samples / non-finite samples.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: stimulus file not found")
    suffix = path.suffix.lower()
    if suffix in AUDIO_EXTENSIONS:
        data, rate = _decode_with_soundfile(path)
    else:
        data, rate = _decode_with_torchcodec(path)
    if data.size == 0:
        raise DataError(f"{path}: the audio stream holds no samples")
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: decoded audio contains NaN or infinite samples")
    return np.asarray(_resample(data, rate, sample_rate), dtype=np.float32)


class StimulusCache:
    """Episode soundtracks, decoded once and memory-mapped.

    Parameters
    ----------
    stimuli_dir : :obj:`str` or :class:`pathlib.Path`
        Folder of stimulus files (see :func:`find_stimuli`).
    cache_dir : :obj:`str` or :class:`pathlib.Path`
        Folder for decoded ``.npy`` waveforms (created if needed).
    sample_rate : :obj:`int`, default=:data:`SAMPLE_RATE`
        Rate of the cached waveforms.

    Attributes
    ----------
    n_decoded : :obj:`int`
        How many files this object decoded (cache misses); useful to check reuse.
    unfetched : :obj:`dict` of :obj:`str` to :class:`pathlib.Path`
        Episodes whose only file is a git-annex link not yet fetched (``datalad get``).

    Examples
    --------
    >>> stimuli = StimulusCache("data/stimuli", "cache/audio")  # doctest: +SKIP
    >>> wave = stimuli.waveform("s01e02a")  # read-only float32 memmap at 22,050 Hz
    """

    def __init__(self, stimuli_dir: str | Path, cache_dir: str | Path, *, sample_rate: int = SAMPLE_RATE) -> None:
        self.stimuli_dir = Path(stimuli_dir)
        self.cache_dir = Path(cache_dir)
        self.sample_rate = int(sample_rate)
        self._files, self.unfetched = scan_stimuli(self.stimuli_dir)
        self._maps: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.n_decoded = 0

    def __repr__(self) -> str:
        return (
            f"StimulusCache({str(self.stimuli_dir)!r}, {str(self.cache_dir)!r}, "
            f"{len(self._files)} episodes, {self.sample_rate} Hz)"
        )

    def __contains__(self, episode: object) -> bool:
        return episode in self._files

    def __len__(self) -> int:
        return len(self._files)

    def episodes(self) -> list[str]:
        """Episode ids that have a stimulus file, sorted."""
        return list(self._files)

    def path(self, episode: str) -> Path:
        """The source file of ``episode``.

        Raises
        ------
        DataError
            No stimulus file for this episode.
        """
        try:
            return self._files[episode]
        except KeyError:
            if episode in self.unfetched:
                path = self.unfetched[episode]
                raise DataError(f"{path}: stimulus of {episode} not fetched: datalad get {path}") from None
            raise DataError(f"{self.stimuli_dir}: no stimulus file for episode {episode!r}") from None

    def cache_path(self, episode: str) -> Path:
        """Where the decoded waveform of ``episode`` is (or will be) cached."""
        source = self.path(episode)
        key = hash_key({"source": file_identity(source), "rate": self.sample_rate, "decoder": _DECODER_VERSION})
        return self.cache_dir / f"{episode}_{key[:20]}.npy"

    def waveform(self, episode: str) -> np.ndarray:
        """Mono float32 waveform of ``episode`` at :attr:`sample_rate`, memory-mapped read-only.

        Decodes and caches the file on first use; later calls (in this or another
        process) open the cached ``.npy``.

        Raises
        ------
        DataError
            No stimulus for this episode, or the file cannot be decoded.
        """
        with self._lock:
            if episode in self._maps:
                return self._maps[episode]
            target = self.cache_path(episode)
            if not target.exists():
                waveform = decode_audio(self.path(episode), self.sample_rate)
                atomic_save_npy(target, waveform)
                self.n_decoded += 1
                for stale in self.cache_dir.glob(f"{episode}_*.npy"):
                    if stale != target:
                        stale.unlink(missing_ok=True)
            try:
                mapped = np.load(target, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"{target}: corrupt cache file ({exc}); delete it to re-decode") from exc
            self._maps[episode] = mapped
            return mapped

    def n_samples(self, episode: str) -> int:
        """Number of samples of ``episode``'s waveform (decodes it if needed)."""
        return int(self.waveform(episode).shape[0])

    def prepare(self, episodes: Iterable[str] | None = None) -> None:
        """Decode and cache ``episodes`` (default: all) now, e.g. before starting workers."""
        for episode in self.episodes() if episodes is None else episodes:
            self.waveform(episode)

    def __getstate__(self) -> dict:
        # Memory maps and locks do not pickle; a copy in another process reopens the .npy files.
        state = self.__dict__.copy()
        state["_maps"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
