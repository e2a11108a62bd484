import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# what edge-fm remembers between runs (the runtime's footprint): never the user's own cache folder
os.environ.setdefault("EDGE_FM_CACHE", tempfile.mkdtemp(prefix="edge-fm-cache-"))
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
