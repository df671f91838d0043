"""fedlora: federated LoRA fine-tuning with DP-SGD and secure aggregation.

This package holds the building blocks shared by the device client
(``client/``) and the coordinator (``server/``): configuration, data, the base
model and its LoRA adapter, and export. ``privacy/`` stands alone beside it.
Importing ``fedlora`` itself is cheap (no torch).
"""

__version__ = "0.1.0"
