"""Privacy reports of a run directory: loading (``rundir``), plots (``plots``, matplotlib),
the self-contained HTML page (``html``) and writing the files (``artefacts``).

The numbers all come from ``fedlora.privacy.report.build_report``; this package only reads
run directories and draws. It imports no torch and no Flower.
"""
