"""Tests for model-zoo serving and its fingerprinting attack (PSML): the selection policy, target
noise, goodput accounting, the zoo behind a real uvicorn on 127.0.0.1, the fingerprinting search
with a query bound, the defense's effect on selection, and the CLI's errors.

The zoo is three members built on the toy run of test_serve (one hand-built int8 ONNX encoder,
byte-identical in every member, and a float Flatten -> Gemm head per member with its own seed and
a declared test accuracy), so everything here takes seconds. Requests go through urllib with
timeouts (qdefend.edge.client).
"""

import math
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from qdefend.attacks.base import AttackError
from qdefend.errors import QdefendError
from qdefend.serve.service import ServeConfig
from qdefend.serve.zoo import (Goodput, Profile, SelectionPolicy, TargetNoise, Targets, ZooEvaluator, ZooService,
                               parse_targets)
from test_serve import TOKEN, LiveServer, toy_served_run

pytestmark = pytest.mark.usefixtures("one_thread")
ACCS = (0.70, 0.80, 0.90)  # the toy members' declared accuracies
NARROW = (0.60, 0.85, 0.88)  # a zoo whose best band is narrow


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return [f"{toy_served_run(root / f'm{i}', seed=10 + i, test_acc=a)}:float" for i, a in enumerate(ACCS)]


@pytest.fixture(scope="module")
def narrow_members(tmp_path_factory):
    """A zoo whose best member's band is narrow, (0.85, 0.88], as in a zoo of near-equal heads."""
    root = tmp_path_factory.mktemp("narrow")
    return [f"{toy_served_run(root / f'm{i}', seed=20 + i, test_acc=a)}:float" for i, a in enumerate(NARROW)]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("tok") / "token.txt"
    p.write_text(TOKEN + "\n")
    return p


def _zoo_server(members, token_file, noise=None, seed=0):
    from qdefend.serve.app import create_app

    cfg = ServeConfig(run=members[0].rsplit(":", 1)[0], zoo=list(members), head="float", token_file=str(token_file),
                      max_batch=64, target_noise=noise, zoo_seed=seed)
    app = create_app(cfg)
    return LiveServer(app), app.state.service


@pytest.fixture(scope="module")
def zoo(members, token_file):
    server, svc = _zoo_server(members, token_file)
    yield server, svc
    server.stop()


@pytest.fixture(scope="module")
def probes():
    return np.random.default_rng(3).random((6, 1, 28, 28), dtype=np.float32)


def _target(server, svc, members, truth=True):
    from qdefend.attacks.zoo import open_zoo_target

    return open_zoo_target(members[0].rsplit(":", 1)[0], f"zoo:{server.url}", token=TOKEN, timeout=10,
                           max_requests=5000, deadline_s=60, truth=ZooEvaluator(svc) if truth else None)


# ------------------------------------------------------------------------------ policy, noise, goodput


def _profiles():
    return [Profile("a", 0.70, 0.1, 0.05), Profile("b", 0.80, 0.1, 0.06), Profile("c", 0.90, 0.3, 0.25)]


def test_policy_picks_the_cheapest_model_meeting_both_targets():
    p = SelectionPolicy(_profiles())
    assert [p.profiles[i].name for i in p.order] == ["a", "b", "c"]  # latency, then accuracy
    assert p.select(Targets()) == 0  # no targets: the cheapest
    assert p.select(Targets(0.75, math.inf, True)) == 1
    assert p.select(Targets(0.80, 5.0, True)) == 1  # an exact accuracy meets its target
    assert p.select(Targets(0.85, 1.0, True)) == 2
    assert p.select(Targets(0.85, 0.2, True)) == 2  # latency cannot be met: the fastest meeting accuracy
    assert p.select(Targets(0.75, 0.01, True)) == 1
    assert p.select(Targets(0.95, math.inf, True)) is None  # nobody meets the accuracy: refused
    assert p.meets(1, Targets(0.8, 1, True)) and not p.meets(0, Targets(0.8, 1, True))


def test_targets_headers_are_parsed_and_checked():
    assert parse_targets(None, None) == Targets()
    assert parse_targets("0.8", None) == Targets(0.8, math.inf, True)
    assert parse_targets(None, "2.5") == Targets(0.0, 2.5, True)
    for acc, lat, words in (("1.2", None, "fraction in"), ("x", None, "fraction in"), (None, "0", "milliseconds"),
                            (None, "nan", "milliseconds")):
        with pytest.raises(ValueError, match=words):
            parse_targets(acc, lat)


def test_target_noise_parses_and_blurs_the_selection_in_proportion():
    assert TargetNoise.parse(None) is None
    n = TargetNoise.parse("uniform:0.05,0.2")
    assert (n.dist, n.accuracy, n.latency) == ("uniform", 0.05, 0.2) and n.spec() == "uniform:0.05,0.2"
    for bad in ("laplace:0.1", "gaussian", "gaussian:x", "gaussian:-1", "gaussian:0.1,0.1,0.1"):
        with pytest.raises(QdefendError, match="--target-noise"):
            TargetNoise.parse(bad)
    t = Targets(0.85, math.inf, True)  # the middle of c's band (0.80, 0.90]
    clean = SelectionPolicy(_profiles(), None)
    assert {clean.select(t) for _ in range(50)} == {2}
    share = []
    for scale in (0.02, 0.05, 0.2):
        p = SelectionPolicy(_profiles(), TargetNoise("gaussian", scale), seed=0)
        picks = np.array([p.select(t) for _ in range(4000)])
        share.append((picks != 2).mean())
    # P(a noisy target falls below 0.80) = Phi(-0.05 / scale); above 0.90 falls back to the clean target
    assert share[0] == pytest.approx(0.0062, abs=0.005)
    assert share[1] == pytest.approx(0.1587, abs=0.02)
    assert share[2] == pytest.approx(0.4013, abs=0.03)
    same = [SelectionPolicy(_profiles(), TargetNoise("uniform", 0.1), seed=5) for _ in range(2)]
    assert [same[0].select(t) for _ in range(30)] == [same[1].select(t) for _ in range(30)]


def test_noise_drawn_per_image_answers_each_image_with_its_own_pick(narrow_members, token_file, probes):
    n = TargetNoise.parse("drop:0.6/image")
    assert (n.per, n.spec()) == ("image", "drop:0.6/image") and TargetNoise.parse("drop:0.6/request").per == "request"
    assert TargetNoise.parse("gaussian:0.02/image").spec() == "gaussian:0.02,0/image"
    with pytest.raises(QdefendError, match="/request or /image"):
        TargetNoise.parse("drop:0.6/often")
    seen = {}
    for noise in ("drop:0.5/image", "drop:0.5"):
        server, svc = _zoo_server(narrow_members, token_file, noise=noise, seed=1)
        try:
            target = _target(server, svc, narrow_members)
            ev = target.truth
            feats = target.encode(probes)
            want = [ev.probabilities(i, feats.q, feats.scale, feats.zero_point, target.sha256) for i in range(3)]
            rows = []
            for _ in range(20):  # the upper end of c's band: each image answered by b or c
                p = target.ask(feats, (0.88, 1000.0))
                rows.append([next(i for i in (1, 2) if np.array_equal(p[k], want[i][k])) for k in range(len(p))])
            seen[noise] = (np.array(rows), svc.goodput.snapshot())
        finally:
            server.stop()
    per_image, snap = seen["drop:0.5/image"]
    mixed = [len(set(r)) > 1 for r in per_image]
    assert sum(mixed) >= 15 and 0.3 <= (per_image == 1).mean() <= 0.7  # 6 images: all alike in 3% of asks
    assert snap["requests"] == 20 and snap["missed_accuracy"] == sum((r == 1).any() for r in per_image)
    per_request, _ = seen["drop:0.5"]
    assert all(len(set(r)) == 1 for r in per_request) and len({r[0] for r in per_request}) == 2


def test_drop_noise_moves_only_targets_above_its_level():
    n = TargetNoise.parse("drop:0.6")
    assert (n.dist, n.accuracy, n.drop_to) == ("drop", 0.6, None) and n.spec() == "drop:0.6"
    assert TargetNoise.parse("drop:0.6,0.7").spec() == "drop:0.6,0.7"
    for bad, words in (("drop:1.5", "accuracy probability"), ("drop:0.5,2", "drop level TO")):
        with pytest.raises(QdefendError, match=words):
            TargetNoise.parse(bad)
    profs = [Profile("a", 0.60, 0.1, 0.05), Profile("b", 0.85, 0.1, 0.05), Profile("c", 0.88, 0.1, 0.05)]

    def shares(noise, a):
        p = SelectionPolicy(profs, TargetNoise.parse(noise), seed=0)
        picks = np.array([p.select(Targets(a, math.inf, True)) for _ in range(3000)])
        return {i: float((picks == i).mean()) for i in set(picks.tolist())}

    assert SelectionPolicy(profs, n).drop_to == 0.85 and SelectionPolicy(profs[:1], n).drop_to == 0.60
    # to the second best (b): anywhere in c's band, even at its upper end, a drop lands on b;
    # targets at or below b's accuracy never move
    for a in (0.88, 0.86):
        got = shares("drop:0.6", a)
        assert set(got) == {1, 2} and got[1] == pytest.approx(0.6, abs=0.03)
    assert shares("drop:0.6", 0.85) == shares("drop:0.6", 0.62) == {1: 1.0}
    # to a lower level: every target above it may land on the member meeting it
    got = shares("drop:0.6,0.6", 0.70)
    assert set(got) == {0, 1} and got[0] == pytest.approx(0.6, abs=0.03)
    assert shares("drop:0.6,0.6", 0.55) == {0: 1.0}


def test_goodput_accounting_counts_each_outcome():
    g = Goodput()
    t = Targets(0.8, 2.0, True)
    assert g.ratio == 1.0
    for met, ms, want in ((True, 1.0, "good"), (True, 3.0, "missed_latency"), (False, 1.0, "missed_accuracy"),
                          (None, 0.0, "refused"), (True, 2.0, "good")):
        o = g.outcome(t, met, ms)
        assert o == want
        g.record(o)
    snap = g.snapshot()
    assert snap["requests"] == 5 and snap["good"] == 2 and snap["goodput"] == pytest.approx(0.4) and g.ratio == 0.4


# ------------------------------------------------------------------------------ the zoo on 127.0.0.1


def _post(url, body, headers):
    from test_serve import http

    from qdefend.edge import wire

    return http(url, "/v1/infer", body, wire.BINARY_TYPE, headers=headers)


def _body(svc, n=2, seed=0):
    from qdefend.edge import wire

    q = np.random.default_rng(seed).integers(-128, 128, (n, *svc.feature_shape), dtype=np.int8)
    sha = next(iter(svc.accepted))
    return q, wire.pack(q, svc.wire["scale"], svc.wire["zero_point"], sha), sha


def test_zoo_profiles_members_and_answers_with_the_selected_one(zoo):
    server, svc = zoo
    d = svc.describe()
    assert [m["accuracy"] for m in d["members"]] == list(ACCS)
    assert all(m["latency_ms"] >= m["measured_ms"] > 0 for m in d["members"])
    assert all(abs(m["latency_ms"] / 0.25 - round(m["latency_ms"] / 0.25)) < 1e-6 for m in d["members"])
    ev = ZooEvaluator(svc)
    assert ev.most_accurate == 2
    q, body, sha = _body(svc)
    want = [ev.probabilities(i, q, svc.wire["scale"], svc.wire["zero_point"], sha) for i in range(3)]
    assert not np.allclose(want[0], want[1]) and not np.allclose(want[1], want[2])
    for acc, member in ((0.5, 0), (0.75, 1), (0.8, 1), (0.85, 2), (0.9, 2)):
        status, res = _post(server.url, body, {"X-Qdefend-Accuracy": str(acc), "X-Qdefend-Latency-Ms": "1000"})
        assert status == 200 and "head" not in res and "_member" not in res
        assert np.array_equal(np.asarray(res["probabilities"], np.float32), want[member]), acc
    status, res = _post(server.url, body, {})  # no targets: the cheapest member
    assert status == 200 and np.array_equal(np.asarray(res["probabilities"], np.float32), want[0])
    status, res = _post(server.url, body, {"X-Qdefend-Accuracy": "0.95"})
    assert status == 422 and "no model of this zoo meets X-Qdefend-Accuracy 0.95" in res["error"]
    status, res = _post(server.url, body, {"X-Qdefend-Latency-Ms": "-3"})
    assert status == 400 and "X-Qdefend-Latency-Ms" in res["error"]
    from test_serve import http

    status, h = http(server.url, "/healthz")
    assert status == 200 and h["head"] == "zoo"
    status, m = http(server.url, "/v1/manifest")
    assert m["head"] is None and m["zoo"]["targets"]["accuracy"] == "X-Qdefend-Accuracy"


def test_goodput_is_exported_on_metrics(members, token_file):
    server, svc = _zoo_server(members, token_file)
    try:
        _, body, _ = _body(svc)
        for acc, lat in ((0.7, 1000), (0.85, 1000), (0.85, 1e-6), (0.99, 1000), (0.2, 1000)):
            _post(server.url, body, {"X-Qdefend-Accuracy": str(acc), "X-Qdefend-Latency-Ms": str(lat)})
        _post(server.url, body, {})  # no targets: not counted
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.stop()
    assert svc.goodput.snapshot() == {"good": 3, "missed_latency": 1, "missed_accuracy": 0, "refused": 1,
                                      "requests": 5, "goodput": pytest.approx(0.6)}
    assert 'qdefend_zoo_requests_total{outcome="good"} 3.0' in text
    assert 'qdefend_zoo_requests_total{outcome="refused"} 1.0' in text
    assert "qdefend_zoo_goodput_ratio 0.6" in text


def test_zoo_refuses_members_that_read_other_features(members, tmp_path):
    other = toy_served_run(tmp_path / "other", seed=4, test_acc=0.8)
    m = __import__("json").loads((other / "manifest.json").read_text())
    m["features"]["wire"]["scale"] = 1 / 128
    from qdefend.edge.manifest import write_manifest

    write_manifest(other, m)
    with pytest.raises(QdefendError, match="must share one encoder"):
        ZooService([members[0], f"{other}:float"], head="float", profile_repeats=2)
    older = toy_served_run(tmp_path / "older", seed=5, test_acc=0.8)  # the same grid, defaults left out
    m = __import__("json").loads((older / "manifest.json").read_text())
    defaults = {"bits": 8, "granularity": "tensor", "order": "release_then_wire"}
    assert all(m["features"]["wire"][k] == v for k, v in defaults.items())
    m["features"]["wire"] = {k: v for k, v in m["features"]["wire"].items() if k not in defaults}
    write_manifest(older, m)
    assert len(ZooService([members[0], f"{older}:float"], head="float", profile_repeats=2).services) == 2
    with pytest.raises(QdefendError, match="given twice"):
        ZooService([members[0], members[0]], head="float")
    bare = toy_served_run(tmp_path / "bare", seed=4)  # no test accuracy in its manifest
    with pytest.raises(QdefendError, match="no test accuracy"):
        ZooService([f"{bare}:float"], head="float", profile_repeats=2)


# ------------------------------------------------------------------------------ fingerprinting


def test_fingerprinting_maps_the_zoo_within_a_query_bound(zoo, members, probes):
    from qdefend.attacks.extraction.fingerprint import FingerprintConfig, fingerprint

    server, svc = zoo
    target = _target(server, svc, members)
    cfg = FingerprintConfig(probes=6, accuracy_steps=6, latency_steps=4, accuracy_tol=0.005,
                            max_fingerprint_queries=600)
    fp = fingerprint(target, probes, cfg)
    assert fp["clusters"] == 3 and fp["refusals_seen"] and fp["victim_identified"]
    assert fp["identification_acc"] >= 0.97 and fp["queries"] <= 600 and fp["queries"] == 6 * fp["targets_asked"]
    assert target.samples == fp["queries"]
    assert 0.80 < fp["pinned"]["accuracy"] <= 0.90  # inside the best model's band
    cands = fp["pin_candidates"]  # without noise every candidate always gets the victim: the middle wins
    assert len(cands) == 3 and all(c["victim_answers"] == c["of"] == 3 for c in cands)
    assert fp["pinned"]["accuracy"] == cands[0]["accuracy"] < cands[1]["accuracy"] < cands[2]["accuracy"]
    bands = [(b["from"], b["to"]) for b in fp["accuracy_bands"]]
    assert [round(b[1], 2) for b in bands[:-1]] == [0.70, 0.80, 0.90]  # the boundaries, to accuracy_tol
    with pytest.raises(AttackError, match="max_fingerprint_queries=60"):
        fingerprint(target, probes, FingerprintConfig(probes=6, max_fingerprint_queries=60))


def test_the_noise_defense_mixes_the_models_behind_pinned_targets(members, token_file, probes):
    from qdefend.attacks.extraction.fingerprint import FingerprintConfig, fingerprint

    cfg = FingerprintConfig(probes=6, accuracy_steps=6, latency_steps=4, accuracy_tol=0.005)
    seen, goodput = {}, {}
    for noise in (None, "gaussian:0.05"):
        server, svc = _zoo_server(members, token_file, noise=noise, seed=1)
        try:
            target = _target(server, svc, members)
            pinned = fingerprint(target, probes, cfg)["pinned"] if noise is None else pinned
            feats = target.encode(probes)
            sigs = {target.ask(feats, (pinned["accuracy"], pinned["latency_ms"])).tobytes() for _ in range(40)}
            seen[noise] = len(sigs)
            for a in np.linspace(0.55, 0.9, 36):  # users' targets
                target.ask(feats, (float(a), 1000.0))
            goodput[noise] = svc.goodput.snapshot()["goodput"]
        finally:
            server.stop()
    assert seen[None] == 1 and seen["gaussian:0.05"] >= 2
    assert goodput[None] > goodput["gaussian:0.05"] > 0.5


def test_drop_noise_over_http_moves_the_best_band_and_spares_the_others(narrow_members, token_file, probes):
    server, svc = _zoo_server(narrow_members, token_file, noise="drop:0.5", seed=1)
    try:
        target = _target(server, svc, narrow_members)
        ev = target.truth
        feats = target.encode(probes)
        want = [ev.probabilities(i, feats.q, feats.scale, feats.zero_point, target.sha256) for i in range(3)]

        def who(targets):
            p = target.ask(feats, targets)
            return next(i for i, w in enumerate(want) if np.array_equal(p, w))

        at_top = [who((0.88, 1000.0)) for _ in range(40)]  # the upper end of the best band: no escape
        below = [who((a, 1000.0)) for a in np.linspace(0.61, 0.85, 20)]  # at or below the drop level
        snap = svc.goodput.snapshot()
    finally:
        server.stop()
    assert set(at_top) == {1, 2} and 0.25 <= at_top.count(1) / 40 <= 0.75
    assert set(below) == {1}  # never moved: b's users keep their goodput
    assert snap["requests"] == 60 and snap["missed_accuracy"] == at_top.count(1)
    assert snap["good"] == 60 - snap["missed_accuracy"] and snap["refused"] == 0


def test_fingerprinting_finds_the_best_model_where_noise_leaves_it_a_minority(narrow_members, token_file, probes):
    from qdefend.attacks.extraction.fingerprint import FingerprintConfig, fingerprint

    server, svc = _zoo_server(narrow_members, token_file, noise="drop:0.7", seed=3)
    try:  # c answers 30% of the requests in its band, b the rest: no majority ever names c
        fp = fingerprint(_target(server, svc, narrow_members), probes,
                         FingerprintConfig(probes=6, accuracy_steps=6, latency_steps=4, accuracy_tol=0.005))
    finally:
        server.stop()
    assert fp["victim_identified"] and fp["victim_member"] == 2 and fp["clusters"] == 3
    assert 0.85 < fp["pinned"]["accuracy"] <= 0.88
    assert all(b["cluster"] != fp["victim_cluster"] for b in fp["accuracy_bands"])  # a minority everywhere


def test_majority_vote_recovers_the_pinned_model_behind_light_noise(narrow_members, token_file, probes):
    from qdefend.attacks.extraction.fingerprint import MajorityVote, _mode

    a, b = np.eye(3)[[0]], np.eye(3)[[1]]
    assert _mode(np.concatenate([b, a, a]), 1e-4)[0].tolist() == a[0].tolist()
    first, agreed = _mode(np.concatenate([a, b]), 1e-4)  # a tie: the first asked
    assert first.tolist() == a[0].tolist() and not agreed
    server, svc = _zoo_server(narrow_members, token_file, noise="drop:0.25", seed=2)
    try:
        target = _target(server, svc, narrow_members)
        target.targets = (0.87, 1000.0)
        feats = [target.encode(probes[i:i + 2]) for i in range(0, 6, 2)]  # the toy release is random:
        target.encode = lambda x, it=iter(feats): next(it)  # fix its draws
        voter = MajorityVote(target, 5, 1e-4)
        got = np.concatenate([voter.predict_proba(probes[i:i + 2]) for i in range(0, 6, 2)])
        best = np.concatenate([target.truth.probabilities(2, f.q, f.scale, f.zero_point, target.sha256)
                               for f in feats])
    finally:
        server.stop()
    assert np.array_equal(got, best) and voter.images == 6 and target.samples == 30
    assert 0 < voter.split <= 6  # some of the three pairs x 5 asks met the other model


def test_vote_is_paid_for_and_checked():
    from qdefend.attacks import build_attack

    with pytest.raises(AttackError, match="mode=naive pins nothing"):
        build_attack("fingerprint", mode="naive", vote=3)
    with pytest.raises(AttackError, match="more than the budget 2"):
        build_attack("fingerprint", vote=3, budgets=[2])


@pytest.mark.slow
def test_fingerprint_then_extract_beats_naive_on_the_toy_zoo(zoo, members):
    from qdefend.attacks import build_attack
    from qdefend.data import DataConfig, load_dataset

    server, svc = zoo
    data = load_dataset(DataConfig(limit_train=600, limit_test=400, val_size=200, aux_size=600))
    quick = dict(budgets=[500], probes=6, accuracy_steps=6, latency_steps=4, accuracy_tol=0.005, epochs=4,
                 min_steps=60, eval_limit=400)
    res = {mode: build_attack("fingerprint", mode=mode, **quick).run(_target(server, svc, members), data, seed=0)
           for mode in ("fingerprint", "naive")}
    fp, naive = res["fingerprint"], res["naive"]
    assert fp.metrics["victim_identified"] == 1.0 and fp.metrics["fingerprint_queries"] > 0
    assert naive.metrics["fingerprint_queries"] == 0 and fp.extra["fidelity_to"].endswith("m2:float")
    assert fp.metrics["fidelity"] > naive.metrics["fidelity"] + 0.05


def test_fingerprint_refuses_a_target_that_is_not_a_zoo():
    from qdefend.attacks import build_attack

    class Service:
        name, kind, offers = "service:x", "service", frozenset({"probabilities", "labels"})

    with pytest.raises(AttackError, match="needs a served model zoo.*zoo:http://127.0.0.1:PORT"):
        build_attack("fingerprint").check(Service())
    with pytest.raises(AttackError, match="mode must be one of"):
        build_attack("fingerprint", mode="clever")
    with pytest.raises(AttackError, match="accuracy_range"):
        build_attack("fingerprint", accuracy_range=[0.9, 0.5])


def test_zoo_target_talks_to_loopback_only(members):
    from qdefend.attacks.zoo import open_zoo_target

    with pytest.raises(AttackError, match="loopback servers only"):
        open_zoo_target(members[0].rsplit(":", 1)[0], "zoo:http://10.1.2.3:8000")
    with pytest.raises(AttackError, match="write zoo:http://127.0.0.1:PORT"):
        open_zoo_target(members[0].rsplit(":", 1)[0], "zoo:127.0.0.1:8000")


# ------------------------------------------------------------------------------ the CLI


def _qdefend(*args):
    return subprocess.run([sys.executable, "-m", "qdefend.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("extra, words", [
    ([], "add --zoo"),
    (["--zoo", "--workers", "2"], "one process"),
    (["--zoo", "--target-noise", "laplace:0.1"], "--target-noise"),
    (["--zoo", "--target-noise", "drop:0.5/often"], "/request or /image"),
])
def test_cli_refuses_bad_zoo_settings_on_one_line(members, extra, words):
    p = _qdefend("serve", *members[:2], "--insecure-no-auth", "--head", "float", *extra)
    assert p.returncode == 2 and words in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr


# ------------------------------------------------------------------------------ the benchmark's table and plot


@pytest.fixture(scope="module")
def psml_bench():
    from conftest import load_benchmark

    yield from load_benchmark("psml")


def _row(fid, acc, **kw):
    return {"fidelity": fid, "clone_acc": acc, "victim_identified": 1.0, "identification_acc": 0.99,
            "fingerprint_queries": 900, "queries": 5000, **kw}


def _load(good, acc_missed, lat_missed):
    return {"goodput": good, "requests": 100, "missed_accuracy": acc_missed, "missed_latency": lat_missed}


def test_benchmark_table_verdict_and_plot_from_fixed_rows(psml_bench, tmp_path):
    row, load = _row, _load
    curve = [{"queries": 1000, "fidelity": 0.85, "clone_acc": 0.80},
             {"queries": 5000, "fidelity": 0.91, "clone_acc": 0.85}]
    kept = {"asks": 3, "kept": 612}
    rows = {"single": row(0.91, 0.85, identification_acc=None, fingerprint_queries=0, curve=curve),
            "naive": row(0.86, 0.81, identification_acc=None, fingerprint_queries=0),
            "fingerprint": row(0.91, 0.85), "goodput@0": load(0.97, 1, 2),
            "defense@gaussian:0.03": {"goodput": load(0.75, 24, 1), "attacks": {
                "steady": row(0.86, 0.84, best_head_share_at_pin=0.7), "vote3": row(0.85, 0.83)}},
            "defense@drop:0.6,mid": {"goodput": load(0.9, 10, 0), "attacks": {
                "steady": row(0.88, 0.845, best_head_share_at_pin=0.4), "vote3": row(0.89, 0.84),
                "filter": row(0.87, 0.83, filter=kept)}},
            "defense@gaussian:0.01": {"goodput": load(0.95, 4, 1), "attacks": {
                "steady": row(0.905, 0.85), "vote3": row(0.9, 0.85, victim_identified=0.0)}}}
    md = psml_bench.markdown(rows, [{"name": "runs/psml/top:int8", "accuracy": 0.86, "latency_ms": 0.1,
                                     "measured_ms": 0.05}], ["steady", "vote3", "filter"])
    assert "| `runs/psml/top:int8` | 86.00% | 0.1 (0.050) | - |" in md
    assert "| fingerprint then extract | 900 + 5000 | 99.0% | 85.00% | 91.00% |" in md
    assert "| none | 97.0% (1.0, 2.0) | 91.00% / 85.00% | - | - | 0 / 0 | 100% |" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| `gaussian") or ln.startswith("| `drop")]
    # gaussian first (first seen), by scale; protection = against the best measured attacker
    assert lines == [
        "| `gaussian:0.01` | 95.0% (4.0, 1.0) | 90.50% / 85.00% | 90.00% / 85.00% (victim missed) | - | "
        "+0.50 (steady) / +0.00 (steady) | - |",
        "| `gaussian:0.03` | 75.0% (24.0, 1.0) | 86.00% / 84.00% | 85.00% / 83.00% | - | +5.00 (steady) / "
        "+1.00 (steady) | 70% |",
        "| `drop:0.6,mid` | 90.0% (10.0, 0.0) | 88.00% / 84.50% | 89.00% / 84.00% | 87.00% / 83.00%, 612 kept | "
        "+2.00 (vote3) / +0.50 (steady) | 40% |"]
    verdicts = [ln for ln in md.splitlines() if ln.startswith("goal")]
    assert verdicts == ["goal (a fidelity cut >= 4 points against the best of the measured attackers (filter, steady, "
                        "vote3) at goodput >= 80%, one seed): **not met**; the best point: `drop:0.6,mid`, 2.00 "
                        "points at 90.0% goodput"]
    for attacker in ("steady", "vote3", "filter"):
        rows["defense@drop:0.6,mid"]["attacks"][attacker]["fidelity"] = 0.86
    verdicts = [ln for ln in psml_bench.markdown(rows, [], ["steady", "vote3"]).splitlines() if ln.startswith("goal")]
    assert verdicts[0].endswith("**met** by 1 noise setting(s); the largest cut: `drop:0.6,mid`, 5.00 points at "
                                "90.0% goodput")
    assert psml_bench.plot(rows, tmp_path / "p.png").stat().st_size > 10_000


def test_benchmark_noise_specs_name_members_and_keep_the_per_image_suffix(psml_bench):
    acc = {"mid": 0.7789}
    assert psml_bench.resolve_noise("drop:0.8,mid/image", acc) == "drop:0.8,0.778900/image"
    assert psml_bench.resolve_noise("drop:0.8,mid", acc) == "drop:0.8,0.778900"
    assert psml_bench.resolve_noise("gaussian:0.05/image", acc) == "gaussian:0.05/image"
    assert TargetNoise.parse(psml_bench.resolve_noise("drop:0.8,mid/image", acc)).per == "image"
    assert psml_bench._noise("defense@drop:0.8,mid/image") == ("drop to mid, per image", 0.8)
    assert psml_bench._noise("defense@drop:0.8,mid") == ("drop to mid", 0.8)
    assert psml_bench._noise("defense@gaussian:0.05") == ("gaussian", 0.05)


def test_benchmark_zoo_choice_is_checked(psml_bench, capsys):
    a = psml_bench.parse_args(["--zoo", "low,mid,upper,high,adam,top", "--noises", "drop:0.9,upper/image"])
    assert a.zoo == ["low", "mid", "upper", "high", "adam", "top"]
    assert psml_bench.parse_args([]).zoo == list(psml_bench.ZOO)
    for bad in ("mid,huge,top", "mid,high", "top", "mid,mid,top"):
        with pytest.raises(SystemExit):
            psml_bench.parse_args(["--zoo", bad])
        assert "top included" in capsys.readouterr().err


def test_benchmark_latency_resolution_defaults_to_the_servers_and_is_checked(psml_bench, capsys):
    from qdefend.serve.service import ServeConfig

    assert psml_bench.parse_args([]).latency_resolution_ms == ServeConfig.latency_resolution_ms
    assert psml_bench.parse_args(["--latency-resolution-ms", "1"]).latency_resolution_ms == 1.0
    for bad in ("0", "-0.5", "nan"):
        with pytest.raises(SystemExit):
            psml_bench.parse_args(["--latency-resolution-ms", bad])
        assert "--latency-resolution-ms" in capsys.readouterr().err


def test_benchmark_across_seeds_uses_each_seeds_best_attacker_and_reports_the_worst(psml_bench, tmp_path):
    row, load = _row, _load

    def seed(ref, good0, good, steady, filt):
        return {"goodput@0": load(good0, 0, 1), "fingerprint": row(ref, 0.85),
                "defense@drop:0.8,mid": {"goodput": load(good, 18, 0), "attacks": {
                    "steady": row(steady, 0.82), "filter": row(filt, 0.83, filter={"asks": 3, "kept": 600}),
                    "tag": row(0.80, 0.78, tag={"kept": 248, "requests": 20})}}}

    # cuts: seed 0 0.91 - 0.86 = 5, seed 1 0.90 - 0.87 (filter) = 3, seed 2 0.91 - 0.86 = 5 points
    by_seed = {"0": seed(0.91, 0.99, 0.82, 0.86, 0.85), "1": seed(0.90, 0.98, 0.79, 0.85, 0.87),
               "2": seed(0.91, 0.99, 0.84, 0.86, 0.84), "7": seed(0.5, 0.5, 0.5, 0.1, 0.1)}
    summary = psml_bench.seed_summary(by_seed, [0, 1, 2])  # seed 7 is stored but not asked for
    none, drop = summary
    assert none["noise"] is None and none["seeds"] == [0, 1, 2] and none["reference_fidelity"] == [0.91, 0.90, 0.91]
    assert drop["noise"] == "drop:0.8,mid" and drop["best_by"] == ["steady", "filter", "steady"]
    assert np.allclose(drop["fidelity_cut"], [0.05, 0.03, 0.05]) and drop["attacks"]["filter"]["kept"] == [600] * 3 and drop["attacks"]["steady"]["kept"] == [None] * 3
    assert drop["attacks"]["tag"]["kept"] == [248] * 3 and drop["attacks"]["tag"]["asks"] == [None] * 3
    assert "| 80.00 ± 0.00; kept 248/248/248 |" in psml_bench.seeds_markdown(summary, ["steady", "filter", "tag"])
    md = psml_bench.seeds_markdown(summary, ["steady", "filter"])
    assert "| none | 0,1,2 | 98.7 ± 0.6 (98.0) | 90.67 ± 0.58 | - | 0 | 0 | - |" in md
    assert ("| `drop:0.8,mid` | 0,1,2 | 81.7 ± 2.5 (79.0) | 85.67 ± 0.58 | 85.33 ± 1.53; R = 3/3/3, kept 600/600/600 "
            "| 4.33 ± 1.15 (3.00, seed 1) | 2.00 ± 0.00 | steady, filter, steady |") in md
    goal = [ln for ln in md.splitlines() if ln.startswith("goal")]
    assert len(goal) == 1 and "**met** by 1 noise setting(s)" in goal[0]
    assert goal[0].endswith("`drop:0.8,mid`, 4.33 ± 1.15 points at 81.7 ± 2.5% goodput over 3 seeds; worst seed: "
                            "cut 3.00 (seed 1), goodput 79.0% (seed 1); 2 of 3 seeds meet both on their own")
    assert "in every seed on its own: no noise setting meets the goal in all its seeds" in md
    by_seed["1"]["defense@drop:0.8,mid"]["attacks"]["filter"]["fidelity"] = 0.89  # seed 1's filter: a 1-point cut
    goal = psml_bench.seeds_verdict(psml_bench.seed_summary(by_seed, [0, 1, 2]))[0]
    assert "**not met**; the best point: `drop:0.8,mid`, 3.67 ± 2.31 points" in goal
    assert psml_bench.seeds_plot(summary, tmp_path / "s.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------ the filtering attacker


def test_filter_asks_maximize_the_kept_victim_answers_per_query():
    from qdefend.attacks.extraction.fingerprint import filter_asks

    # (1 - 0.8^R) / (R + 1): 0.100, 0.120, 0.122, 0.118 for R = 1..4
    assert [filter_asks(s) for s in (0.1, 0.2, 0.3, 0.5, 1.0)] == [4, 3, 2, 1, 0]


def test_filter_is_paid_for_and_checked():
    from qdefend.attacks import build_attack

    for kw, words in [({"mode": "naive", "filter": 3}, "needs mode=fingerprint and vote=1"),
                      ({"vote": 3, "filter": 3}, "needs mode=fingerprint and vote=1"),
                      ({"filter": 3, "budgets": [500, 1000]}, "give one budget.*--set budgets=1000"),
                      ({"filter": 3, "budgets": [3]}, "asks each image 4 times, more than the budget 3"),
                      ({"filter": "often"}, "number of asks an image, auto or seq.*--set filter=3"),
                      ({"filter": -1}, "fingerprint.filter must be")]:
        with pytest.raises(AttackError, match=words):
            build_attack("fingerprint", **kw)
    assert build_attack("fingerprint", filter="auto", budgets=[500]).config.filter == "auto"
    assert build_attack("fingerprint", filter="seq", budgets=[500]).config.filter == "seq"


def _collect_behind_drop(narrow_members, token_file, pool_size, **attack):
    """The fingerprint attack's query phase (budget 480, 6 probes) against the narrow zoo behind
    drop:0.7; returns (collect's info, the transfer set's answers, the best member's answers to
    every encoding sent after the probes, images sent, requests sent)."""
    from types import SimpleNamespace

    from qdefend.attacks import build_attack
    from qdefend.attacks.extraction.common import QueryOracle, QueryPool

    server, svc = _zoo_server(narrow_members, token_file, noise="drop:0.7", seed=3)
    try:
        target = _target(server, svc, narrow_members)
        sent = []  # every encoding sent (the toy release is random): the truth's answers for them
        encode = target.encode
        target.encode = lambda x: sent.append(encode(x)) or sent[-1]
        atk = build_attack("fingerprint", budgets=[480], probes=6, accuracy_steps=6, latency_steps=4,
                           accuracy_tol=0.005, **attack)
        pool = QueryPool(np.random.default_rng(4).random((pool_size, 1, 28, 28), dtype=np.float32), None,
                         rng=np.random.default_rng(5))
        oracle = QueryOracle(target, "probabilities", 480, 10, 40)
        info = atk.collect(oracle, pool, SimpleNamespace(say=lambda m: None, seed=0, rng=np.random.default_rng(6)))
        best = np.concatenate([target.truth.probabilities(2, f.q, f.scale, f.zero_point, target.sha256)
                               for f in sent[1:]])
        return info, oracle.transfer_set()[1], best, target.samples, target.requests
    finally:
        server.stop()


def test_filtering_attacker_keeps_only_the_victims_answers_behind_drop_noise(narrow_members, token_file):
    """drop:0.7 sends 70% of the requests for c (0.88) to b (0.85): the attacker finds b as its
    reference from its own map, pins b where noise never moves it, and keeps only c's answers."""
    info, ys, best, samples, requests = _collect_behind_drop(narrow_members, token_file, 300, filter="auto",
                                                             query_batch=40)
    fp, filt = info["fingerprint"], info["filter"]
    ref = fp["reference"]
    assert fp["victim_identified"] and fp["reference_member"].endswith("m1:float")
    assert 0.60 < ref["accuracy"] <= 0.85 and ref["reference_answers"] == ref["of"] == 3  # never moves
    assert 0.1 <= ref["victim_share_at_pin"] <= 0.6 and ref["asks"] == 2 + (ref["victim_share_at_pin"] < 0.25)
    asks = ref["asks"] + 1
    assert filt["images"] == 480 // asks and filt["queries"] == filt["images"] * asks <= 480
    assert samples == fp["queries"] + filt["queries"]  # every ask is paid for
    assert requests == fp["queries"] // 6 + filt["images"] // 40 * asks  # one request per 40 images and ask
    assert 0 < filt["kept"] == len(ys) < filt["images"] and not filt["fallback"]
    # every kept answer is c's for its image (the truth's answers of the encodings sent)
    assert all(np.abs(best - y).max(1).min() <= 1e-6 for y in ys)


def test_reference_filter_keeps_the_first_answer_that_differs_from_the_reference():
    from qdefend.attacks.extraction.fingerprint import ReferenceFilter

    a, b, c = (np.eye(3)[[k, k]] for k in range(3))  # two images; each model answers both alike

    class Zoo:  # scripted answers: asks at the pin, then the reference ask
        targets = (0.9, 10.0)

        def __init__(self, answers):
            self.answers = iter(answers)

        def encode(self, x):
            return x

        def ask(self, feats, targets):
            return next(self.answers)

    f = ReferenceFilter(Zoo([b, c, a, b]), 3, (0.6, 1000.0), 1e-4)  # reference b: c, the first that differs
    assert f.predict_proba(np.zeros((2, 1))).tolist() == c.tolist() and f.kept[0].all()
    f = ReferenceFilter(Zoo([b, b, b]), 2, (0.6, 1000.0), 1e-4)  # nothing differs: dropped
    assert f.predict_proba(np.zeros((2, 1))).tolist() == b.tolist() and not f.kept[0].any()
    assert f.first[0].tolist() == b.tolist() and f.images == 2


def test_sequential_filter_stops_asking_an_image_once_it_differs_and_keeps_to_its_budget():
    from qdefend.attacks.extraction.fingerprint import SequentialFilter
    from qdefend.edge.runtime import Features

    a, b, c = np.eye(3)

    class Zoo:  # one answer per row asked, scripted per ask: the reference ask, then asks at the pin
        targets = (0.9, 10.0)

        def __init__(self, answers):
            self.answers, self.asked = iter(answers), []

        def encode(self, x):
            return Features(np.zeros((len(x), 4), np.int8), 0.1, 0)

        def ask(self, feats, targets):
            self.asked.append((len(feats.q), targets))
            return np.stack(next(self.answers)[:len(feats.q)])

    zoo = Zoo([[b, b, b], [b, c, b], [a, b], [b]])  # reference b; image 1 differs first, then image 0
    f = SequentialFilter(zoo, 3, (0.6, 1000.0), 1e-4, budget=100)
    out = f.predict_proba(np.zeros((3, 1)))
    assert out.tolist() == [a.tolist(), c.tolist(), b.tolist()] and f.kept[0].tolist() == [True, True, False]
    assert [n for n, _ in zoo.asked] == [3, 3, 2, 1] and f.spent == 9 and f.images == 3  # 3 asks at most
    assert zoo.asked[0][1] == (0.6, 1000.0) and f.first[0].tolist() == [b.tolist(), c.tolist(), b.tolist()]
    zoo = Zoo([[b, b], [b, b], [c]])  # budget 5: the reference (2), the pin (2), then one image more
    f = SequentialFilter(zoo, 8, (0.6, 1000.0), 1e-4, budget=5)
    assert f.predict_proba(np.zeros((2, 1))).tolist() == [c.tolist(), b.tolist()] and f.spent == 5
    assert f.predict_proba(np.zeros((2, 1))).tolist() == [[0, 0, 0]] * 2  # nothing left: not asked, dropped
    assert np.concatenate(f.kept).tolist() == [True, False, False, False] and f.images == 2


def test_sequential_filtering_attacker_spends_its_budget_on_the_victims_answers(narrow_members, token_file):
    """The same drop:0.7 zoo as the filter's test: one reference ask an image, then asks at the pin
    until c answers; every ask is paid for, and every kept answer is c's."""
    info, ys, best, samples, requests = _collect_behind_drop(narrow_members, token_file, 600, filter="seq",
                                                             query_batch=40)
    fp, filt = info["fingerprint"], info["filter"]
    assert fp["victim_identified"] and filt["sequential"] and filt["asks"] == 16
    assert filt["queries"] == 480 and samples == fp["queries"] + 480  # the whole budget, each ask paid for
    assert 0 < filt["kept"] == len(ys) <= filt["images"] < 240 and not filt["fallback"]
    assert all(np.abs(best - y).max(1).min() <= 1e-6 for y in ys)


@pytest.mark.slow
def test_filtering_attack_runs_end_to_end_and_reports_what_it_paid(narrow_members, token_file):
    from qdefend.attacks import build_attack
    from qdefend.data import DataConfig, load_dataset

    data = load_dataset(DataConfig(limit_train=600, limit_test=300, val_size=200, aux_size=600))
    server, svc = _zoo_server(narrow_members, token_file, noise="drop:0.7", seed=3)
    try:
        res = build_attack("fingerprint", budgets=[480], probes=6, accuracy_steps=6, latency_steps=4,
                           accuracy_tol=0.005, filter="auto", epochs=2, min_steps=20, eval_limit=300,
                           query_batch=40).run(_target(server, svc, narrow_members), data, seed=0)
    finally:
        server.stop()
    filt, m = res.extra["filter"], res.metrics
    assert m["victim_identified"] == 1.0 and res.extra["fingerprint"]["reference_member"].endswith("m1:float")
    assert m["queries"] == filt["queries"] == filt["images"] * (filt["asks"] + 1) <= 480
    assert m["filter_kept"] == filt["kept"] > 0 and res.extra["curve"][0]["queries"] == filt["kept"]
    assert any(n.startswith("filter: each of") for n in res.extra["notes"])


# ------------------------------------------------------------------------------ the tagging attacker


def test_tag_images_pay_for_the_probes_of_every_request():
    from qdefend.attacks.extraction.fingerprint import tag_images

    assert tag_images(5000, 8, 256) == (4840, 20)  # 20 requests: 160 probes + 4,840 images
    assert tag_images(480, 6, 64) == (432, 8)
    assert tag_images(100, 6, 64) == (88, 2)  # the last request is not full
    for budget, n, b in [(5000, 8, 256), (480, 6, 64), (100, 6, 64), (7, 6, 64)]:
        images, requests = tag_images(budget, n, b)
        assert images + n * requests <= budget and images <= requests * (b - n)


def test_tag_is_checked():
    from qdefend.attacks import build_attack

    for kw, words in [({"tag": True, "vote": 3}, "needs mode=fingerprint, vote=1 and filter=0"),
                      ({"tag": True, "filter": "auto", "budgets": [500]}, "needs mode=fingerprint, vote=1 and filter=0"),
                      ({"tag": True, "mode": "naive"}, "needs mode=fingerprint, vote=1 and filter=0"),
                      ({"tag": True, "policy": "adaptive"}, "needs policy=random and one budget"),
                      ({"tag": True, "budgets": [500, 1000]}, "needs policy=random and one budget.*--set budgets=1000")]:
        with pytest.raises(AttackError, match=words):
            build_attack("fingerprint", **kw)


def test_tagging_attacker_keeps_the_requests_the_victim_answered(narrow_members, token_file):
    """drop:0.7 sends 70% of the requests for c (0.88) to b (0.85); the probes carried in every
    request name the head that answered it, so the attacker keeps c's requests only, paying for
    the probes."""
    info, ys, best, samples, requests = _collect_behind_drop(narrow_members, token_file, 600, tag=True)
    fp, tag = info["fingerprint"], info["tag"]
    assert fp["victim_identified"] and "victim_signature" not in fp
    assert (tag["images"], tag["requests"], tag["probes"]) == (432, 8, 6)  # max_batch 64: 58 images a request
    assert samples == fp["queries"] + tag["queries"] and tag["queries"] == 432 + 6 * 8 <= 480  # probes paid for
    assert requests == fp["queries"] // 6 + 8
    assert 0 < tag["kept_requests"] < 8 and len(ys) == tag["kept"] < 432 and not tag["fallback"]
    assert all(np.abs(best - y).max(1).min() <= 1e-6 for y in ys)  # every kept answer is c's
