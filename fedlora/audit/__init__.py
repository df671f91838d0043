"""``fedlora audit``: an empirical lower bound on ε from one training run with canaries.

:mod:`fedlora.audit.score` scores each canary (how much training lowered its loss),
:mod:`fedlora.audit.run` runs the simulation with the canaries and writes
``AUDIT_DIR/audit.json``; the bound itself is :mod:`fedlora.privacy.audit`.
"""
