"""The work behind the notebooks, one module per notebook step.

Each module's functions are the run's cached stages (:class:`lowbit_helpers.rundir.Stage`); the
paths of what a step writes, relative to the run directory, are module constants of the step
that writes them, and everything else refers to them by name:

* :mod:`.baseline`: notebooks 01 and 02 (baseline ONNX, calibration tensor, FP32 evaluation,
  latency, parity with Ultralytics);
* :mod:`.int8`: notebook 03 (INT8 variants through the registered backends, their validation
  under every engine, latency);
* :mod:`.sensitivity`: notebook 04 (per-layer sensitivity sweep, metric validation, Torch proxy,
  schemes);
* :mod:`.candidates`: notebook 05 (the 4-bit method ladder, every scheme materialised and scored,
  winners chosen on one split and confirmed on another, latency);
* :mod:`.summary`: notebook 06 (what to ship, the picks' detections, FP32's per-class AP);
* :mod:`.splits`: what 03 and 05 share: selection / confirmation splits, FP32 references, scoring.

Notebook 06 reads the other steps' results (nothing is recomputed when they are current) and draws
them with :mod:`lowbit_helpers.report`.
"""
