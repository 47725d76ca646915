"""The process around a run: library chatter and offline mode.

``quiet_libraries`` only turns logging and progress bars down.  Whether the
Hugging Face hub may be reached is a run option (``RunConfig.offline``, also
on when ``HF_HUB_OFFLINE`` is set); embedded models and corpora never need it.
"""

from __future__ import annotations

import logging
import os
import warnings

TRUE = ("1", "true", "yes", "on")


def quiet_libraries() -> None:
    """Keep library chatter (progress bars, advisory warnings) off the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning, module="bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # torchao (the `peers` extra) warns at import that its CUDA-only kernels do not load on a CPU
    # machine, and torch's pytree warns about torchao's enums: neither concerns a quantsink user
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog
    except ImportError:
        return
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def offline_from_env() -> bool:
    """Whether the environment asks for offline mode (``HF_HUB_OFFLINE`` truthy)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE
