"""Files a run writes and reads back: atomic writes of tables and JSON (``io``), resumable units stored without
pickles (``units``), and the run directory's ledger of checksums and its lock (``rundir``). No model, no torch
beyond tensors as data; every layer above may use it.
"""
