"""Put first on PYTHONPATH: this interpreter (and every process it starts) cannot import
TensorFlow or Keras, as on a host where they are not installed; each attempt is recorded in
the file ``BATCHERY_TEST_TF_ATTEMPTS`` names, so a test can show none was made."""

from __future__ import annotations

import importlib.abc
import os
import sys
from typing import Any

BLOCKED = ("tensorflow", "keras", "tf_keras")


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in BLOCKED:
            record = os.environ.get("BATCHERY_TEST_TF_ATTEMPTS")
            if record:
                with open(record, "a") as out:
                    out.write(f"{os.getpid()} {name}\n")
            raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
        return None


sys.meta_path.insert(0, _NoTensorFlow())
