"""The model registry: every trained model is registered; the ``champion`` alias moves by rule.

The gate compares the candidate with the current champion on the SAME fixed test
split, both scored by the same function (flows.stages.evaluate.score_bundle), and moves the
alias only when the rule says so. Both versions are tagged with the decision and the
numbers, so the registry page tells why the alias is where it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict, Field

CHAMPION = "champion"


class PromotionRule(BaseModel):
    """When a candidate replaces the champion."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("geoscore", pattern=r"^[A-Za-z0-9_]+$", description="evaluation metric to compare")
    higher_is_better: bool = Field(True, description="geoscore, accuracies: True; distances (median_km): False")
    min_improvement: float = Field(0.0, description="the candidate must beat the champion by more than this "
                                                    "(in the metric's units; negative: accept small regressions)")
    promote_without_champion: bool = Field(True, description="the first registered model becomes champion")


@dataclass
class Decision:
    promote: bool
    reason: str
    candidate: float
    champion: float | None

    def tags(self) -> dict[str, str]:
        """Tags for the candidate version."""
        return {"gate.decision": "promoted" if self.promote else "rejected",
                "gate.reason": self.reason, "gate.candidate_score": f"{self.candidate:.6g}",
                "gate.champion_score": "none" if self.champion is None else f"{self.champion:.6g}"}


def decide(rule: PromotionRule, candidate: float, champion: float | None) -> Decision:
    """Apply the rule to two scores (the champion's None when there is none)."""
    m = rule.metric
    if not math.isfinite(candidate):
        return Decision(False, f"candidate {m} is not finite ({candidate})", candidate, champion)
    if champion is None:
        ok = rule.promote_without_champion
        return Decision(ok, "no champion yet" + ("" if ok else " and promote_without_champion is off"), candidate, None)
    gain = (candidate - champion) if rule.higher_is_better else (champion - candidate)
    ok = gain > rule.min_improvement
    word = "improves on" if gain > 0 else "does not improve on"
    return Decision(ok, f"candidate {m} {candidate:.6g} {word} champion {champion:.6g} by {gain:+.6g} "
                        f"({'>' if ok else '<='} min_improvement {rule.min_improvement:g})", candidate, champion)


def register(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Register ``model_uri`` (a pyfunc logged by run ``run_id``) as a new version of ``name``."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="HierLoc geolocation models (pyfunc: photo -> place)")
    mv = client.create_model_version(name, model_uri, run_id=run_id, tags=tags)
    return mv.version


def champion_version(client: MlflowClient, name: str):
    """The ModelVersion behind the ``champion`` alias, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def apply_decision(client: MlflowClient, name: str, candidate_version: str, champion, decision: Decision) -> None:
    """Tag both versions with the decision and move the alias if it says so."""
    for k, v in decision.tags().items():
        client.set_model_version_tag(name, candidate_version, k, v)
    if champion is not None:
        prefix = f"gate.vs_v{candidate_version}"
        outcome = f"replaced by v{candidate_version}" if decision.promote else f"kept against v{candidate_version}"
        for k, v in {f"{prefix}.outcome": outcome, f"{prefix}.reason": decision.reason,
                     f"{prefix}.champion_score": f"{decision.champion:.6g}",
                     f"{prefix}.candidate_score": f"{decision.candidate:.6g}"}.items():
            client.set_model_version_tag(name, champion.version, k, v)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, candidate_version)
