"""hear-brainsoundnet: brain-aligned SoundNet models behind the HEAR API (placeholder until the API lands)."""
from ._version import __version__
