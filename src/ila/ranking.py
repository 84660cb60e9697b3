"""The ranking artefact: layers sorted by importance score, as strict versioned JSON keyed by module name.

A ranking is what stage 2 writes (``stage2/ranking.json``) and what selection, export and the comparison
tools read. It records the model it belongs to (name, architecture, the digest of its layer names) so that a
ranking of another model is refused rather than silently applied to layers of the same name.

Selections follow the method's words: the *top-k* layers are the first ``round(fraction * N)`` of the
ranking, the *bottom-k* the last ``round(fraction * N)``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._version import __version__
from .artifacts import envelope, read_json, write_json_atomic
from .errors import IlaError, RankingError
from .layers import Layer, layer_names_digest

SCHEMA_VERSION = 1
KIND = "ila.ranking"


@dataclass
class Ranking:
    scores: dict[str, float]
    """Importance score s_i of every layer, keyed by full module name."""
    layers: list[Layer]
    """The layers in model order (gives blocks and module types)."""
    base_model: dict[str, Any]
    include_lm_head: bool
    scorer: str = "ila"
    milestone: str | None = None
    config_sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about how the scores were obtained (steps, losses, optimiser...)."""

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        if set(names) != set(self.scores):
            extra = sorted(set(self.scores) - set(names))[:3]
            lacking = sorted(set(names) - set(self.scores))[:3]
            raise RankingError(f"scores and layers disagree (unknown: {extra}, without a score: {lacking})")
        for name, s in self.scores.items():
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s):
                raise RankingError(f"score of {name} is {s!r}; every score must be a finite number")

    # -- the method's words -------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def order(self) -> list[str]:
        """Layer names, most important first; ties broken by model order so the order is deterministic."""
        position = {layer.name: i for i, layer in enumerate(self.layers)}
        return sorted(self.scores, key=lambda n: (-self.scores[n], position[n]))

    def gates(self) -> dict[str, float] | None:
        """sigmoid(s) of every layer: the stage-2 gates. Only ILA's scores are gate logits; for every other
        scorer (SNR, block index, random numbers) a sigmoid of the score means nothing, and this is None."""
        if self.scorer != "ila":
            return None
        return {n: 1.0 / (1.0 + math.exp(-s)) if s > -700 else 0.0 for n, s in self.scores.items()}

    def count(self, fraction: float) -> int:
        """round(fraction * N), at least 1."""
        if not 0.0 < fraction <= 1.0:
            raise RankingError(f"fraction must be in (0, 1], got {fraction}")
        return max(1, round(fraction * self.num_layers))

    def top(self, fraction: float) -> list[str]:
        """The top-k layers: tune only the important."""
        return self.order[: self.count(fraction)]

    def bottom(self, fraction: float) -> list[str]:
        return self.order[-self.count(fraction) :]

    def drop_bottom(self, fraction: float) -> list[str]:
        """Every layer except the bottom-k: freeze the unimportant."""
        if fraction >= 1.0:
            raise RankingError("dropping the bottom 100 % leaves no layer to tune")
        kept = self.order[: self.num_layers - round(fraction * self.num_layers)]
        if not kept:
            raise RankingError(f"dropping the bottom {fraction:.0%} leaves no layer to tune")
        return kept

    def select(
        self,
        mode: Literal["top", "drop_bottom", "list"],
        fraction: float | None = 0.3,
        layers: Sequence[str] = (),
    ) -> list[str]:
        """The selected layer names, in ranking order: the one place where a selection is chosen (stage 3,
        ``ila select`` / ``export`` / ``finetune``, :func:`ila.select`). ``top``: the top ``fraction``;
        ``drop_bottom``: all but the bottom ``fraction``; ``list``: exactly ``layers``, misspelt names refused
        with the closest real ones."""
        if mode == "list":
            if not layers:
                raise RankingError("the explicit selection is empty; name at least one layer")
            self.check_names(layers)
            chosen = set(layers)
            return [n for n in self.order if n in chosen]
        if mode not in ("top", "drop_bottom"):
            raise RankingError(f"unknown selection mode {mode!r} (top, drop_bottom or list)")
        if fraction is None or isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise RankingError(f"selection mode {mode!r} needs a fraction in (0, 1], got {fraction!r}")
        if mode == "top":
            if not 0.0 < fraction <= 1.0:
                raise RankingError(f"--top fraction must be in (0, 1], got {fraction}")
            return self.top(float(fraction))
        if not 0.0 < fraction < 1.0:
            raise RankingError(
                f"--drop-bottom fraction must be in (0, 1), got {fraction} (1 would tune nothing)"
            )
        return self.drop_bottom(float(fraction))

    def check_names(self, names: Sequence[str]) -> None:
        """Raise :class:`RankingError` naming every name that is no layer of this ranking, with the closest
        real names."""
        known = [layer.name for layer in self.layers]
        known_set = set(known)
        unknown = [n for n in dict.fromkeys(names) if n not in known_set]
        if not unknown:
            return
        lines = []
        for name in unknown[:5]:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            lines.append(
                f"{name!r}" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else "")
            )
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise RankingError(
            f"{len(unknown)} name(s) match no layer of this ranking: {'; '.join(lines)}{more}. "
            f"Layer names are full module names such as {known[0]!r}"
        )

    def selection_record(
        self, names: Sequence[str], *, mode: str, fraction: float | None, ranking_path: str | Path | None
    ) -> dict[str, Any]:
        """The one layout of ``selection.json``.

        Stage 3 and ``ila export`` write it, adding their own fields.
        """
        return {
            **envelope("ila.selection"),
            "mode": mode,
            "fraction": None if mode == "list" else float(fraction),  # type: ignore[arg-type]
            "ranking": None if ranking_path is None else str(ranking_path),
            "base_model": self.base_model,
            "include_lm_head": self.include_lm_head,
            "num_selected": len(names),
            "num_layers": self.num_layers,
            "layers": list(names),
        }

    def block_aggregates(self) -> dict[str, dict[str, float]]:
        """Per block: mean score, mean gate (ILA only), and the block's rank by mean score
        (1 = most important)."""
        gates = self.gates()
        groups: dict[str, list[str]] = {}
        for layer in self.layers:
            groups.setdefault(layer.block or layer.module_type, []).append(layer.name)
        agg = {
            block: {
                "mean_score": sum(self.scores[n] for n in names) / len(names),
                "num_layers": len(names),
                **({"mean_gate": sum(gates[n] for n in names) / len(names)} if gates is not None else {}),
            }
            for block, names in groups.items()
        }
        for rank, block in enumerate(sorted(agg, key=lambda b: -agg[b]["mean_score"]), start=1):
            agg[block]["rank"] = rank
        return agg

    # -- checks ---------------------------------------------------------------------------------------------

    def check_matches(self, layers: Sequence[Layer], base_model: dict[str, Any] | None = None) -> None:
        """Refuse to apply this ranking to a model whose layers differ."""
        mine = {layer.name for layer in self.layers}
        theirs = {layer.name for layer in layers}
        if base_model is not None:
            for key in ("model_type", "num_hidden_layers", "hidden_size"):
                a, b = self.base_model.get(key), base_model.get(key)
                if a is not None and b is not None and a != b:
                    raise RankingError(
                        f"this ranking is of another model ({key} {a} vs {b} "
                        f"for {base_model.get('name')}); "
                        "rank the layers of this model first (ila score), "
                        "or use `ila compare` to relate the two"
                    )
        if mine != theirs:
            only_mine = sorted(mine - theirs)
            only_theirs = sorted(theirs - mine)
            raise RankingError(
                f"the ranking's {len(mine)} layers differ from the model's {len(theirs)} "
                f"(e.g. ranked but absent: {only_mine[:2]}, present but unranked: {only_theirs[:2]}); "
                "was it made for another model, or with a different lora.include_lm_head / module_types?"
            )

    # -- file format ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        order = self.order
        rank = {n: i + 1 for i, n in enumerate(order)}
        gates = self.gates()
        return {
            **envelope(KIND, SCHEMA_VERSION),
            "scorer": self.scorer,
            "base_model": self.base_model,
            "num_layers": self.num_layers,
            "num_blocks": len({layer.block for layer in self.layers if layer.block is not None}),
            "include_lm_head": self.include_lm_head,
            "layer_digest": layer_names_digest([layer.name for layer in self.layers]),
            "milestone": self.milestone,
            "config_sha256": self.config_sha256,
            "order": order,
            "layers": {
                layer.name: {
                    "score": float(self.scores[layer.name]),
                    **({"gate": float(gates[layer.name])} if gates is not None else {}),
                    "rank": rank[layer.name],
                    "block": layer.block,
                    "block_index": layer.block_index,
                    "module_type": layer.module_type,
                }
                for layer in self.layers
            },
            "blocks": self.block_aggregates(),
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> Path:
        try:
            return write_json_atomic(path, self.to_dict())
        except IlaError as e:
            raise RankingError(f"refusing to write ranking: {e}") from None

    @classmethod
    def from_dict(cls, data: Any, source: str = "ranking") -> Ranking:
        if not isinstance(data, dict):
            raise RankingError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if data.get("kind") != KIND:
            raise RankingError(f"{source}: not an ila ranking (kind is {data.get('kind')!r})")
        if version != SCHEMA_VERSION:
            raise RankingError(
                f"{source}: schema_version {version!r} is not supported by ila {__version__} "
                f"(supported: {SCHEMA_VERSION}); upgrade ila or re-run the scoring"
            )
        try:
            raw_layers = data["layers"]
            layers = [
                Layer(name, entry["block"], entry["block_index"], entry["module_type"])
                for name, entry in raw_layers.items()
            ]
            scores = {name: entry["score"] for name, entry in raw_layers.items()}
            base_model = data["base_model"]
            include_lm_head = data["include_lm_head"]
        except (KeyError, TypeError, AttributeError) as e:
            raise RankingError(f"{source}: malformed ranking, missing or wrong field {e}") from None
        if not isinstance(include_lm_head, bool) or not isinstance(base_model, dict):
            raise RankingError(f"{source}: malformed ranking (include_lm_head / base_model)")
        if data.get("num_layers") != len(layers):
            raise RankingError(
                f"{source}: num_layers {data.get('num_layers')} but {len(layers)} layers listed"
            )
        ranking = cls(
            scores=scores,
            layers=layers,
            base_model=base_model,
            include_lm_head=include_lm_head,
            scorer=data.get("scorer", "ila"),
            milestone=data.get("milestone"),
            config_sha256=data.get("config_sha256"),
            meta=data.get("meta") or {},
        )
        if "order" in data and data["order"] != ranking.order:
            raise RankingError(
                f"{source}: 'order' disagrees with the scores; the file was edited or corrupted"
            )
        return ranking

    @classmethod
    def load(cls, path: str | Path) -> Ranking:
        try:
            data = read_json(path, "ranking")
        except IlaError as e:
            raise RankingError(str(e)) from None
        return cls.from_dict(data, str(path))
