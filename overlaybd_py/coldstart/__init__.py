"""The cold-start experiment: images, an emulated WAN, full pull vs lazy vs prefetch vs warm,
and the analysis of traces (summaries, plots). Used by ``overlaybd-py trace`` and ``bench``."""
