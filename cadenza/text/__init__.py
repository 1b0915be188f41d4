"""Text in and out of the model: stop strings."""

from cadenza.text.stops import StopStrings

__all__ = ["StopStrings"]
