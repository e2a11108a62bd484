import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# What edge-fm remembers between runs (the runtime's footprint, ranked parents, SmolLM2 converted from
# its GGUF): never the user's own cache folder. One folder per test run, shared by its xdist workers,
# so the real SmolLM2 (538 MB, about a minute to convert) is converted once per run, not per worker;
# the cache's writes are atomic renames, so workers racing on one entry leave a whole file.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
    _CACHE = os.path.join(tempfile.gettempdir(), f"edge-fm-cache-{_RUN}")
    os.makedirs(_CACHE, exist_ok=True)
    os.environ.setdefault("EDGE_FM_CACHE", _CACHE)
else:
    os.environ.setdefault("EDGE_FM_CACHE", tempfile.mkdtemp(prefix="edge-fm-cache-"))
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
