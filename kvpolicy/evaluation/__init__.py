"""Quality and cost evaluation of KV-cache policies (the engine behind ``kvpolicy compare``).

``texts`` supplies real prose, ``tasks`` the quality tasks, ``measure`` the timing and memory
bookkeeping, ``runner`` runs policies over tasks, ``report`` prints, saves and plots results.
"""

from .tasks import PRESETS, TASKS, EvalSizes
from .texts import TextsUnavailableError

__all__ = ["EvalSizes", "PRESETS", "TASKS", "TextsUnavailableError"]
