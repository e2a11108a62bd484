"""This device: what it has (profile), what it may spend (budget), and the device classes.

Names load lazily; the profile and budget paths never import torch unless a GPU is probed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_sdk._lazy import lazy_face

_NAMES: dict[str, str] = {
    "DeviceClass": "edge_sdk.device._classes",
    "DeviceProfile": "edge_sdk.device._profile",
    "compute_budget": "edge_sdk.device._budget",
    "detect_profile": "edge_sdk.device._profile",
    "list_device_classes": "edge_sdk.device._classes",
    "load_device_class": "edge_sdk.device._classes",
    "tune_allocator": "edge_sdk.device._allocator",
}

__all__ = [
    "DeviceClass",
    "DeviceProfile",
    "compute_budget",
    "detect_profile",
    "list_device_classes",
    "load_device_class",
    "tune_allocator",
]

__getattr__, __dir__ = lazy_face(__name__, _NAMES, globals())

if TYPE_CHECKING:
    from edge_sdk.device._allocator import tune_allocator
    from edge_sdk.device._budget import compute_budget
    from edge_sdk.device._classes import DeviceClass, list_device_classes, load_device_class
    from edge_sdk.device._profile import DeviceProfile, detect_profile
