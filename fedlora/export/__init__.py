"""Export: merge the global LoRA adapter into the base and quantize it for devices.

The front door is :func:`export_run`; the parts are usable alone:

* :mod:`~fedlora.export.merge` — adapter + base → merged fp32 checkpoint;
* :mod:`~fedlora.export.int8` — weight-only int8 artefact and its PyTorch runtime;
* :mod:`~fedlora.export.quality` — KL / top-1 / perplexity against a reference, and the gate;
* :mod:`~fedlora.export.formats` — the registry the pipeline writes formats from;
* :mod:`~fedlora.export.manifest` — ``manifest.json``, written last, and its verification.
"""
