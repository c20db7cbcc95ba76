"""The one adapter to learn2learn 0.2.0 (an unmaintained release): everything metafusion uses of it.

learn2learn imports `gym` at import time, and gym 0.26 prints a multi-line "unmaintained" notice to
stderr on import. metafusion never uses learn2learn's gym environments, so the notice is swallowed
here to keep `import metafusion` quiet.
"""

from __future__ import annotations

import contextlib
import io
import warnings

with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import learn2learn as l2l

from learn2learn.algorithms import MAML, MetaSGD  # noqa: E402
from learn2learn.algorithms.maml import maml_update  # noqa: E402
from learn2learn.data import MetaDataset, TaskDataset  # noqa: E402
from learn2learn.data.transforms import KShots, NWays  # noqa: E402
from learn2learn.utils import clone_module, update_module  # noqa: E402

__version__ = l2l.__version__
__all__ = [
    "MAML",
    "MetaSGD",
    "maml_update",
    "MetaDataset",
    "TaskDataset",
    "KShots",
    "NWays",
    "clone_module",
    "update_module",
    "__version__",
]
