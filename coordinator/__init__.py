"""edge-fm coordinator: salience ranking, reordering, budget-matched slicing and aggregation."""

from __future__ import annotations

__all__: list[str] = []
