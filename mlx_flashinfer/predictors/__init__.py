"""Which neurons a token needs: the predictor kinds (`kinds.py`: all, gate, oracle,
and the trained low-rank and low-bit ones), their calibration on shipped text
(`calibrate.py`, `quality.py`, `train.py`, the texts in `data/`) and the report a
user sees (`report.py`). The flash FFN asks a predictor; it never imports one."""
