"""The work behind the notebooks, one module per notebook step.

Each module's functions are the run's cached stages (see :mod:`lowbit_helpers.rundir`); the
paths of what a step writes, relative to the run directory, are module constants of the step
that writes them, and everything else refers to them by name:

* :mod:`.baseline`: notebooks 01 and 02 (baseline ONNX, calibration tensor, FP32 evaluation,
  latency, parity with Ultralytics);
* :mod:`.int8`: notebook 03 (INT8 variants, their validation and latency);
* :mod:`.sensitivity`: notebook 04 (per-layer sensitivity sweep, mAP check, Torch proxy, schemes).
"""
