"""The champion gate's rule, and registration + alias moves on a real (sqlite) model registry."""

import math

import pytest

from flows.tracking.registry import CHAMPION, PromotionRule, apply_decision, champion_version, decide, register


def test_first_model_is_promoted_unless_told_otherwise():
    assert decide(PromotionRule(), 3000.0, None).promote
    d = decide(PromotionRule(promote_without_champion=False), 3000.0, None)
    assert not d.promote and "promote_without_champion" in d.reason


@pytest.mark.parametrize("cand, champ, min_imp, expected", [
    (3001.0, 3000.0, 0.0, True),
    (3000.0, 3000.0, 0.0, False),  # a tie keeps the champion
    (3005.0, 3000.0, 10.0, False),  # better, but not by enough
    (2995.0, 3000.0, -10.0, True),  # a tolerated regression
])
def test_higher_is_better_with_a_margin(cand, champ, min_imp, expected):
    d = decide(PromotionRule(min_improvement=min_imp), cand, champ)
    assert d.promote is expected
    assert f"{champ:.6g}" in d.reason and f"{cand:.6g}" in d.reason


def test_lower_is_better_metrics():
    rule = PromotionRule(metric="median_km", higher_is_better=False)
    assert decide(rule, 120.0, 150.0).promote
    assert not decide(rule, 180.0, 150.0).promote


def test_a_nan_candidate_never_wins():
    assert not decide(PromotionRule(), math.nan, 10.0).promote
    assert not decide(PromotionRule(), math.nan, None).promote


def test_rule_fields_are_validated():
    with pytest.raises(ValueError):
        PromotionRule(metric="geo score; drop")


def test_register_and_move_the_alias(tmp_path):
    """Real registry calls against a sqlite store; the model URI is a plain artifact folder."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("reg", artifact_location=(tmp_path / "art").as_uri())
    runs = [client.create_run(exp).info.run_id for _ in range(2)]
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    v1 = register(client, "m", str(tmp_path / "model"), runs[0], {"geoscore": "3000"})
    assert champion_version(client, "m") is None
    apply_decision(client, "m", v1, None, decide(PromotionRule(), 3000.0, None))
    assert champion_version(client, "m").version == v1
    v2 = register(client, "m", str(tmp_path / "model"), runs[1], {"geoscore": "2900"})
    champ = champion_version(client, "m")
    d = decide(PromotionRule(), 2900.0, 3000.0)
    apply_decision(client, "m", v2, champ, d)
    assert client.get_model_version_by_alias("m", CHAMPION).version == v1  # rejected: the alias stays
    assert client.get_model_version("m", v2).tags["gate.decision"] == "rejected"
    assert client.get_model_version("m", v1).tags[f"gate.vs_v{v2}.outcome"] == f"kept against v{v2}"
    mlflow.set_tracking_uri(None)
