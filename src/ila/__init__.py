"""ila: find the layers of a language model that matter for alignment, and fine-tune only those.

Implements ILA (Shi et al., "Understanding Layer Significance in LLM Alignment", arXiv 2410.17875).

Words used throughout (see README): a *layer* is one LoRA-adapted linear module, named by its full module
name; a *block* is one decoder layer; the *gate* of layer i is sigmoid(s_i), where s_i is its *score*; the
*ranking* is the layers sorted by score; a *selection* is the set of layers a fine-tuning run adapts.

Python API (the command line only wraps these)::

    from ila import load_config, run_all, Ranking, rank_layers, select, apply_selection
    cfg = load_config("configs/tiny.yaml", ["stage2.steps=20"])
    run_all(cfg, "runs/example")
    ranking = Ranking.load("runs/example/stage2/ranking.json")
    ranking.top(0.3)          # the 30 % most important layers
    names = select(ranking, drop_bottom=0.25)
    peft_model = apply_selection(model, names, method="lora")
"""

from ._version import __version__
from .config import RunConfig, load_config
from .errors import ConfigError, DataError, IlaError, ModelError, RankingError, TrainingError
from .ranking import Ranking


def __getattr__(name: str):  # the training stack is imported lazily so that `ila --help` stays fast
    if name in ("run_all", "stage1", "stage2", "stage3", "prepare_run_dir"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("select", "apply_selection"):
        from . import selection

        return getattr(selection, name)
    if name in ("rank_layers", "IlaCallback"):
        from . import integration

        return getattr(integration, name)
    raise AttributeError(name)


__all__ = [
    "__version__",
    "RunConfig",
    "load_config",
    "Ranking",
    "run_all",
    "stage1",
    "stage2",
    "stage3",
    "prepare_run_dir",
    "rank_layers",
    "select",
    "apply_selection",
    "IlaCallback",
    "IlaError",
    "ConfigError",
    "DataError",
    "ModelError",
    "RankingError",
    "TrainingError",
]
